"""`peer-bench layer`: our PEER layer against PEER-pytorch (the public reference) on one device.

    peer-bench layer --num-experts 262144 --modes fwd_bwd
    peer-bench layer --num-experts 1048576 --modes step --optimizers lazy_adam,adagrad --json
    peer-bench layer --num-experts 1048576 --modes step --state-dtype fp32,bf16
    peer-bench layer --device cuda --dtype fp32,bf16 --num-experts 1048576 --dim 1024 \
        --tokens 4096,8192,16384,32768 --modes fwd_bwd --json

1. Check: both layers get the same weights (PEER-pytorch's copied into ours; ours runs without
   query BatchNorm, which PEER-pytorch lacks) and the same input; rel_diff = |y_ours - y_ref| /
   |y_ref|, at a small size and at the benchmark size.
2. Timing: each (impl, mode, optimizer) runs in its own subprocess, so that peak memory (peak RSS
   minus the RSS after imports) is that row's alone. fwd_bwd = forward + backward of
   sum(y * g) for a fixed random g; step = fwd_bwd + optimizer step (ours: the row-sparse table
   optimizer + torch Adam on the router; PEER-pytorch: torch Adam on all parameters).
   work memory = peak RSS minus RSS once the layer and optimizer state are built (what a step
   adds on top of parameters and state).
   tokens/s comes from the best (least) time over --repeats after --warmup iterations; the
   median is in the JSON too. On CUDA, memory is the caching allocator's (peak allocated).
3. Roofline: the mix is memory-bound, so each row also gives the bytes an ideal layer must move
   (`mix_bytes`: the selected rows of U and V read once per pass, activations in and out, table
   gradients written, and in step mode the optimizer's read-modify-write of the touched rows
   and their state) over the copy bandwidth measured on the same device in the same run:
   roofline_fraction = (bytes / copy bandwidth) / time. The router's few bytes are left out.
   --dtype bf16 runs ours with bf16 activations and bf16 tables (model.peer.table_dtype) and
   PEER-pytorch with its parameters and input in bf16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch

from peer_dist import cli
from peer_dist.config import TABLE_OPTIMIZERS, TABLE_STATE_DTYPES
from peer_dist.tools.bench import add_shape_args, memory_error, shape_error

IMPLS = ("peer_dist", "peer-pytorch")
DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd_bwd", "step")
OPTIMIZERS = TABLE_OPTIMIZERS
STATE_DTYPES = TABLE_STATE_DTYPES



def _parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="peer-bench layer", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, num_experts=512 * 512, dim=256,
                   d_key="query dim per head, even (PEER-pytorch's dim_key is half of it)")
    p.add_argument("--tokens", type=cli.int_list(1, cli.MAX_COUNT), default="1024",
                   help="comma list of token counts per batch")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--dtype", type=cli.names(tuple(DTYPES)), default="fp32",
                   help=f"comma list of {list(DTYPES)}")
    p.add_argument("--modes", type=cli.names(MODES), default="fwd_bwd,step",
                   help=f"comma list of {list(MODES)}")
    p.add_argument("--impls", type=cli.names(IMPLS), default=",".join(IMPLS),
                   help=f"comma list of {list(IMPLS)}")
    p.add_argument("--optimizers", type=cli.names(OPTIMIZERS), default="lazy_adam,adagrad",
                   help=f"our table optimizers in step mode, comma list of {list(OPTIMIZERS)}")
    p.add_argument("--state-dtype", type=cli.names(STATE_DTYPES), default="fp32",
                   help=f"our table optimizer state dtypes in step mode, comma list of "
                        f"{list(STATE_DTYPES)} (optim.table_state_dtype)")
    p.add_argument("--no-batchnorm", action="store_true",
                   help="time ours without query BatchNorm (on by default, as in the paper)")
    p.add_argument("--repeats", type=cli.COUNT, default=3)
    p.add_argument("--warmup", type=cli.ints(0, cli.MAX_COUNT), default=1)
    p.add_argument("--threads", type=cli.ints(1, cli.MAX_THREADS), default=2)
    p.add_argument("--check-tokens", type=cli.COUNT, default=256, help="tokens in the output check")
    p.add_argument("--no-check", action="store_true", help="skip the output check")
    p.add_argument("--json", action="store_true", help="one JSON object per measured row")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace) -> str | None:
    """The one-line error for flags that are valid one by one but not together, or not on this
    machine; None when the run can start (checked once here, not in each row's child)."""
    import importlib.util

    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device=cuda is invalid here: this torch sees no CUDA device (allowed: cpu)"
    bad = shape_error(args.num_experts, args.heads, args.topk, args.d_key)
    if bad:
        return bad
    if "peer_dist" in args.impls and not args.no_batchnorm and min(args.tokens) < 2:
        return (f"--tokens={min(args.tokens)} is invalid with query BatchNorm (a training "
                "batch of 1 token cannot be normalised): allowed are token counts >= 2, or "
                "--no-batchnorm")
    n = math.isqrt(args.num_experts)
    params = 4 * (2 * args.num_experts * args.dim + args.heads * args.d_key * (args.dim + n))
    bad = memory_error(f"--num-experts={args.num_experts} --dim={args.dim} --heads="
                       f"{args.heads} --d-key={args.d_key}", "the layer's fp32 parameters",
                       params, args.device)
    if bad:
        return bad
    sel = args.heads * args.topk
    acts = max(args.tokens) * (4 * 4 * args.dim + 12 * sel)  # x, y, dy, dx; ids and gates
    bad = memory_error(f"--tokens={max(args.tokens)}", "the layer's parameters and a batch's "
                       "activations", params + acts, args.device)
    if bad or "peer-pytorch" not in args.impls:
        return bad
    check = 4 * args.check_tokens * (2 * sel * args.dim + 2 * args.dim)  # PEER-pytorch's rows
    bad = None if args.no_check else memory_error(
        f"--check-tokens={args.check_tokens}", "the output check's parameters and gathered rows",
        params + check, args.device)
    if not bad and importlib.util.find_spec("PEER_pytorch") is None:
        bad = ("--impls=peer-pytorch is invalid here: PEER-pytorch is not installed (allowed: "
               "--impls peer_dist, or pip install 'peer_dist[bench]')")
    return bad


# --------------------------------------------------------------------------- building layers

def build_ours(args: argparse.Namespace, batchnorm: bool, tables: bool = True,
               dtype: str = "fp32"):
    from peer_dist.config import PEERConfig
    from peer_dist.model.peer import PEER

    cfg = PEERConfig(num_experts=args.num_experts, heads=args.heads, topk=args.topk,
                     d_key=args.d_key, query_batchnorm=batchnorm, table_dtype=dtype)
    cfg.validate()
    return PEER(args.dim, cfg, seed=0, table_device="cpu" if tables else "meta")


def build_theirs(args: argparse.Namespace):
    try:
        from PEER_pytorch import PEER as RefPEER
    except ImportError as e:
        raise SystemExit("peer-bench layer: PEER-pytorch is not installed (allowed: "
                         "--impls peer_dist, or pip install 'peer_dist[bench]')") from e
    return RefPEER(args.dim, heads=args.heads, num_experts=args.num_experts,
                   num_experts_per_head=args.topk, dim_key=args.d_key // 2,
                   product_key_topk=args.topk, non_competing_scores=False)


@torch.no_grad()
def copy_reference_weights(ours, theirs) -> None:
    """Make `ours` compute exactly what `theirs` computes (ours must have no query BN).

    PEER-pytorch: queries Linear(D, 2*H*Qh) read as (p=2, h, Qh) channels; keys (H, n, 2, Qh);
    ids = i_x * n + i_y. Ours: query channels read as (h, 2, Qh); sub_keys (H, 2, n, Qh).
    The tables are shared, not copied (no second N x D allocation).
    """
    h, qh = ours.router.heads, ours.router.d_key // 2
    w = theirs.to_queries[0].weight  # (2*H*Qh, D), channel = p*H*Qh + h*Qh + j
    ours.router.query.weight.copy_(w.view(2, h, qh, -1).transpose(0, 1).reshape_as(w))
    ours.router.sub_keys.copy_(theirs.keys.permute(0, 2, 1, 3))
    ours.experts.u = torch.nn.Parameter(theirs.weight_down_embed.weight.detach())
    ours.experts.v = torch.nn.Parameter(theirs.weight_up_embed.weight.detach())


def check_outputs(args: argparse.Namespace, tokens: int, seed: int = 0) -> float:
    """rel_diff of the two layers' outputs on the same weights and input (fp32)."""
    torch.manual_seed(seed)
    with torch.device(args.device):
        theirs = build_theirs(args)
    ours = build_ours(args, batchnorm=False, tables=False)
    copy_reference_weights(ours, theirs)
    ours.to(args.device)
    x = torch.randn(tokens, args.dim, device=args.device)
    with torch.no_grad():
        ref = theirs(x[None])[0]
        got = ours(x)
    return float((got - ref).norm() / ref.norm())


# --------------------------------------------------------------------------- timing (child)

def _peak_rss_bytes() -> int:
    from peer_dist.train.metrics import peak_rss_bytes

    return peak_rss_bytes()


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: fall back to the peak so far
        return _peak_rss_bytes()


class _Memory:
    """Bytes in use now and at peak: RSS on CPU, the caching allocator's on CUDA."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _current_rss_bytes()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _peak_rss_bytes()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a device copy (bytes read + bytes written), best of `repeats`."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats + 1):  # the first copy warms up (page faults, clocks)
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def mix_bytes(args: argparse.Namespace, tokens: int, mode: str, dtype: str,
              state_dtype: str = "fp32", optimizer: str = "") -> int:
    """Bytes an ideal PEER mix must move per iteration (module docstring, 3.)."""
    from peer_dist.tools.memory_model import expected_unique

    table = act = DTYPES[dtype].itemsize
    d, sel = args.dim, args.heads * args.topk
    rows = expected_unique(args.num_experts, tokens * sel)  # distinct rows selected
    fwd = 2 * rows * d * table + 2 * tokens * d * act  # U, V rows; x in, y out
    bwd = 2 * rows * d * table * 2 + 3 * tokens * d * act  # U, V rows; du, dv; x, dy, dx
    total = fwd + bwd
    if mode == "step":
        state = {"lazy_adam": 2, "dense_adam": 2, "adagrad": 0, "sgd": 0}.get(optimizer, 2)
        per_entry = 3 * table + 2 * state * DTYPES[state_dtype].itemsize  # p rw, grad; state rw
        total += 2 * rows * d * per_entry
    return int(total)


def _make_step(args: argparse.Namespace, spec: dict):
    """Build the layer (and optimizers) and return a closure doing one measured iteration."""
    from peer_dist.train.sparse_optim import STATE_DTYPES as OPT_DTYPES
    from peer_dist.train.sparse_optim import RowSparseOptimizer

    impl, mode, device = spec["impl"], spec["mode"], args.device
    dtype = DTYPES[spec["dtype"]]
    torch.manual_seed(0)
    if impl == "peer_dist":
        layer = build_ours(args, batchnorm=not args.no_batchnorm, tables=False,
                           dtype=spec["dtype"])
        layer.router.to(device, dtype)
        experts = layer.experts
        for name in ("u", "v"):  # drawn in place on the device: no host copy, no temporary
            table = torch.empty(args.num_experts, args.dim, device=device, dtype=dtype)
            setattr(experts, name, torch.nn.Parameter(table.normal_(0.0, experts.std)))
        x = torch.randn(spec["tokens"], args.dim, device=device, dtype=dtype)
    else:
        with torch.device(device):  # PEER-pytorch's tables initialised where they live
            layer = build_theirs(args).to(dtype)
        x = torch.randn(1, spec["tokens"], args.dim, device=device, dtype=dtype)
    grad_y = torch.randn_like(x)
    opts: list[torch.optim.Optimizer] = []
    if mode == "step" and impl == "peer_dist":
        tables = [layer.experts.u, layer.experts.v]
        table_opt = RowSparseOptimizer(tables, kind=spec["optimizer"], lr=1e-3,
                                       state_dtype=OPT_DTYPES[spec["state_dtype"]])
        for p in tables:
            table_opt.init_state(p)  # state allocated up front, counted in the peak
        opts = [table_opt, torch.optim.Adam(layer.router.parameters(), lr=1e-3)]
    elif mode == "step":
        opts = [torch.optim.Adam(layer.parameters(), lr=1e-3)]

    def iteration() -> None:
        layer.zero_grad(set_to_none=True)
        (layer(x) * grad_y).sum().backward()
        for opt in opts:
            opt.step()

    return iteration


def run_child(args: argparse.Namespace, spec: dict) -> dict:
    torch.set_num_threads(args.threads)
    if spec["impl"] == "copy":
        return dict(copy_bytes_per_s=copy_bandwidth(
            args.device, 1 << 30 if args.device == "cuda" else 1 << 28))
    if spec["impl"] == "peer_dist":  # code (and our compiled kernels) loaded before the baseline
        from peer_dist.model.peer import PEER  # noqa: F401
        from peer_dist.ops import cpu as fused_cpu
        fused_cpu.library()
    else:
        import PEER_pytorch  # noqa: F401
    mem = _Memory(args.device)
    base = mem.current()
    iteration = _make_step(args, spec)
    built = mem.current()  # parameters (and optimizer state, allocated up front)
    for _ in range(args.warmup):
        iteration()
    times = []
    for _ in range(args.repeats):
        _sync(args.device)
        t0 = time.perf_counter()
        iteration()
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    peak = mem.peak()
    return dict(tokens_per_s=spec["tokens"] / min(times),
                tokens_per_s_median=spec["tokens"] / statistics.median(times),
                seconds=min(times), peak_mem_bytes=peak - base, work_mem_bytes=peak - built,
                peak_bytes=peak, base_bytes=base)


def _spawn(argv: list[str], spec: dict) -> dict:
    cmd = [sys.executable, "-m", "peer_dist.tools.bench_layer", *argv, "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:  # e.g. out of memory at the largest shape: a row that says so
        last = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        print(f"peer-bench layer: {spec} failed: {last}", file=sys.stderr)
        return dict(error=last[-500:], tokens_per_s=math.nan, tokens_per_s_median=math.nan,
                    seconds=math.nan, peak_mem_bytes=math.nan, work_mem_bytes=math.nan)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report

def _rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for tokens, dtype, mode, impl in itertools.product(
            dict.fromkeys(args.tokens), args.dtype, args.modes, args.impls):
        common = dict(impl=impl, mode=mode, tokens=tokens, dtype=dtype)
        if mode == "step" and impl == "peer_dist":
            rows += [dict(common, optimizer=o, state_dtype=sd)
                     for o in args.optimizers for sd in args.state_dtype]
        elif mode == "step":  # torch Adam keeps its state in the parameters' dtype
            rows.append(dict(common, optimizer="adam", state_dtype=dtype))
        else:
            rows.append(dict(common, optimizer=""))
    return rows


def _key(r: dict) -> tuple:
    return r["mode"], r["tokens"], r["dtype"]


def _table(results: list[dict]) -> str:
    ref = {_key(r): r for r in results if r["impl"] == "peer-pytorch"}
    head = (f"{'impl':<13}{'mode':<9}{'optimizer':<11}{'state':<6}{'dtype':<6}{'tokens':>7}"
            f"{'tokens/s':>11}{'peak MB':>10}{'work MB':>10}{'roofline':>9}{'speed x':>9}"
            f"{'mem x':>8}{'work x':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        other = ref.get(_key(r))
        speed = r["tokens_per_s"] / other["tokens_per_s"] if other else math.nan
        mem = r["peak_mem_bytes"] / other["peak_mem_bytes"] if other else math.nan
        work = r["work_mem_bytes"] / other["work_mem_bytes"] if other else math.nan
        lines.append(f"{r['impl']:<13}{r['mode']:<9}{r.get('optimizer', ''):<11}"
                     f"{r.get('state_dtype', ''):<6}{r['dtype']:<6}{r['tokens']:>7}"
                     f"{r['tokens_per_s']:>11.0f}{r['peak_mem_bytes'] / 2**20:>10.0f}"
                     f"{r['work_mem_bytes'] / 2**20:>10.0f}{r['roofline_fraction']:>9.1%}"
                     f"{speed:>9.2f}{mem:>8.2f}{work:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(args, json.loads(args.child))))
        return
    problem = _check(args)  # every flag checked before any work
    if problem:
        p.error(problem)
    specs = _rows(args)
    torch.set_num_threads(args.threads)
    rel_diff = math.nan
    if not args.no_check and any(s["impl"] == "peer-pytorch" for s in specs):  # the reference
        n_small = max(64, args.topk)  # PEER-pytorch needs topk <= sqrt(N) keys too
        small = argparse.Namespace(**{**vars(args), "num_experts": n_small * n_small})
        small_diff = check_outputs(small, args.check_tokens)
        rel_diff = check_outputs(args, args.check_tokens)
        if not args.json:
            print(f"output check (same weights, fp32, ours without query BN): rel_diff = "
                  f"{small_diff:.2e} at N={small.num_experts}, {rel_diff:.2e} at "
                  f"N={args.num_experts} ({args.check_tokens} tokens)")
    shape = dict(num_experts=args.num_experts, dim=args.dim, heads=args.heads, topk=args.topk,
                 d_key=args.d_key, threads=args.threads, device=args.device)
    child_argv = [a for a in argv if a != "--json"]
    copy_bps = _spawn(child_argv, {"impl": "copy"}).get("copy_bytes_per_s", math.nan)
    if not args.json:
        print(f"copy bandwidth on {args.device}: {copy_bps / 1e9:.1f} GB/s (read + write)")
    results = []
    for spec in specs:
        # strict JSON has no NaN: no check made (one implementation alone) is null
        row = {**spec, **shape, **_spawn(child_argv, spec),
               "rel_diff": None if math.isnan(rel_diff) else rel_diff}
        row["bytes_moved"] = mix_bytes(args, spec["tokens"], spec["mode"], spec["dtype"],
                                       spec.get("state_dtype", "fp32"), spec["optimizer"])
        row["copy_bytes_per_s"] = copy_bps
        row["roofline_fraction"] = row["bytes_moved"] / copy_bps / row["seconds"]
        if row["mode"] != "step":
            row.pop("optimizer")
        results.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"N={args.num_experts} d={args.dim} h={args.heads} k={args.topk} "
              f"d_key={args.d_key} on {args.device}, threads={args.threads}; tokens/s from "
              f"the best of {args.repeats} after {args.warmup} warmup; peak = peak memory minus "
              f"memory after imports; work = peak minus memory once the layer and optimizer "
              f"state are built; roofline = ideal bytes / copy bandwidth / time; "
              f"x = ours / PEER-pytorch")
        print(_table(results))
    failed = [r for r in results if "error" in r]
    if failed:
        raise SystemExit(f"peer-bench layer: {len(failed)} of {len(results)} rows failed "
                         "(their errors are above)")


if __name__ == "__main__":
    main()
