"""`peer-bench layer`: our PEER layer against PEER-pytorch (the public reference) on one device.

    peer-bench layer --num-experts 262144 --modes fwd_bwd
    peer-bench layer --num-experts 1048576 --modes step --optimizers lazy_adam,adagrad --json
    peer-bench layer --num-experts 1048576 --modes step --state-dtype fp32,bf16

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
   median is in the JSON too.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch

from peer_dist.config import TABLE_OPTIMIZERS, TABLE_STATE_DTYPES

IMPLS = ("peer_dist", "peer-pytorch")
MODES = ("fwd_bwd", "step")
OPTIMIZERS = TABLE_OPTIMIZERS
STATE_DTYPES = TABLE_STATE_DTYPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peer-bench layer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-experts", type=int, default=512 * 512, help="N (a perfect square)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--d-key", type=int, default=128,
                   help="query dim per head (PEER-pytorch's dim_key is half of it)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--modes", default="fwd_bwd,step", help=f"comma list of {list(MODES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    p.add_argument("--optimizers", default="lazy_adam,adagrad",
                   help=f"our table optimizers in step mode, comma list of {list(OPTIMIZERS)}")
    p.add_argument("--state-dtype", default="fp32",
                   help=f"our table optimizer state dtypes in step mode, comma list of "
                        f"{list(STATE_DTYPES)} (optim.table_state_dtype)")
    p.add_argument("--no-batchnorm", action="store_true",
                   help="time ours without query BatchNorm (on by default, as in the paper)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-tokens", type=int, default=256, help="tokens in the output check")
    p.add_argument("--no-check", action="store_true", help="skip the output check")
    p.add_argument("--json", action="store_true", help="one JSON object per measured row")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _split(arg: str, allowed: tuple[str, ...], name: str) -> list[str]:
    items = [s.strip() for s in arg.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{name}={arg!r} is invalid: allowed are {list(allowed)}")
    return items


# --------------------------------------------------------------------------- building layers

def build_ours(args: argparse.Namespace, batchnorm: bool, tables: bool = True):
    from peer_dist.config import PEERConfig
    from peer_dist.model.peer import PEER

    cfg = PEERConfig(num_experts=args.num_experts, heads=args.heads, topk=args.topk,
                     d_key=args.d_key, query_batchnorm=batchnorm)
    cfg.validate()
    return PEER(args.dim, cfg, seed=0, table_device="cpu" if tables else "meta")


def build_theirs(args: argparse.Namespace):
    try:
        from PEER_pytorch import PEER as RefPEER
    except ImportError as e:
        raise SystemExit("PEER-pytorch is not installed: pip install 'peer_dist[bench]'") from e
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
    """rel_diff of the two layers' outputs on the same weights and input."""
    torch.manual_seed(seed)
    theirs = build_theirs(args)
    ours = build_ours(args, batchnorm=False, tables=False)
    copy_reference_weights(ours, theirs)
    x = torch.randn(tokens, args.dim)
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


def _make_step(args: argparse.Namespace, impl: str, mode: str, optimizer: str,
               state_dtype: str = "fp32"):
    """Build the layer (and optimizers) and return a closure doing one measured iteration."""
    from peer_dist.train.sparse_optim import STATE_DTYPES as DTYPES
    from peer_dist.train.sparse_optim import RowSparseOptimizer

    torch.manual_seed(0)
    if impl == "peer_dist":
        layer = build_ours(args, batchnorm=not args.no_batchnorm)
        x = torch.randn(args.tokens, args.dim)
    else:
        layer = build_theirs(args)
        x = torch.randn(1, args.tokens, args.dim)
    grad_y = torch.randn_like(x)
    opts: list[torch.optim.Optimizer] = []
    if mode == "step" and impl == "peer_dist":
        tables = [layer.experts.u, layer.experts.v]
        table_opt = RowSparseOptimizer(tables, kind=optimizer, lr=1e-3,
                                       state_dtype=DTYPES[state_dtype])
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
    if spec["impl"] == "peer_dist":  # code (and our compiled kernels) loaded before the baseline
        from peer_dist.model.peer import PEER  # noqa: F401
        from peer_dist.ops import cpu as fused_cpu
        fused_cpu.library()
    else:
        import PEER_pytorch  # noqa: F401
    base = _current_rss_bytes()
    iteration = _make_step(args, spec["impl"], spec["mode"], spec["optimizer"],
                           spec.get("state_dtype", "fp32"))
    built = _current_rss_bytes()  # parameters (and optimizer state, allocated up front)
    for _ in range(args.warmup):
        iteration()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t0)
    peak = _peak_rss_bytes()
    return dict(tokens_per_s=args.tokens / min(times),
                tokens_per_s_median=args.tokens / statistics.median(times),
                peak_mem_bytes=peak - base, work_mem_bytes=peak - built, peak_rss_bytes=peak,
                base_rss_bytes=base)


def _spawn(argv: list[str], spec: dict) -> dict:
    cmd = [sys.executable, "-m", "peer_dist.tools.bench_layer", *argv, "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child {spec} failed (exit {out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report

def _rows(args: argparse.Namespace) -> list[dict]:
    impls = _split(args.impls, IMPLS, "impls")
    modes = _split(args.modes, MODES, "modes")
    optimizers = _split(args.optimizers, OPTIMIZERS, "optimizers")
    state_dtypes = _split(args.state_dtype, STATE_DTYPES, "state-dtype")
    rows = []
    for mode in modes:
        for impl in impls:
            if mode == "step" and impl == "peer_dist":
                rows += [dict(impl=impl, mode=mode, optimizer=o, state_dtype=sd)
                         for o in optimizers for sd in state_dtypes]
            elif mode == "step":  # torch Adam keeps fp32 state
                rows.append(dict(impl=impl, mode=mode, optimizer="adam", state_dtype="fp32"))
            else:
                rows.append(dict(impl=impl, mode=mode, optimizer=""))
    return rows


def _table(results: list[dict]) -> str:
    ref = {r["mode"]: r for r in results if r["impl"] == "peer-pytorch"}
    head = (f"{'impl':<13}{'mode':<9}{'optimizer':<11}{'state':<6}{'tokens/s':>10}{'peak MB':>10}"
            f"{'work MB':>10}{'speed x':>9}{'mem x':>8}{'work x':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        other = ref.get(r["mode"])
        speed = r["tokens_per_s"] / other["tokens_per_s"] if other else math.nan
        mem = r["peak_mem_bytes"] / other["peak_mem_bytes"] if other else math.nan
        work = r["work_mem_bytes"] / other["work_mem_bytes"] if other else math.nan
        lines.append(f"{r['impl']:<13}{r['mode']:<9}{r.get('optimizer', ''):<11}"
                     f"{r.get('state_dtype', ''):<6}"
                     f"{r['tokens_per_s']:>10.0f}{r['peak_mem_bytes'] / 2**20:>10.0f}"
                     f"{r['work_mem_bytes'] / 2**20:>10.0f}{speed:>9.2f}{mem:>8.2f}{work:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(args, json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    rel_diff = math.nan
    if not args.no_check:
        small = argparse.Namespace(**{**vars(args), "num_experts": 64 * 64})
        small_diff = check_outputs(small, args.check_tokens)
        rel_diff = check_outputs(args, args.check_tokens)
        if not args.json:
            print(f"output check (same weights, ours without query BN): rel_diff = "
                  f"{small_diff:.2e} at N=4096, {rel_diff:.2e} at N={args.num_experts} "
                  f"({args.check_tokens} tokens)")
    shape = dict(num_experts=args.num_experts, dim=args.dim, heads=args.heads, topk=args.topk,
                 d_key=args.d_key, tokens=args.tokens, threads=args.threads)
    child_argv = [a for a in argv if a != "--json"]
    results = []
    for spec in _rows(args):
        row = {**spec, **shape, **_spawn(child_argv, spec), "rel_diff": rel_diff}
        if row["mode"] != "step":
            row.pop("optimizer")
        results.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"N={args.num_experts} d={args.dim} h={args.heads} k={args.topk} "
              f"d_key={args.d_key} tokens={args.tokens} threads={args.threads}; tokens/s from "
              f"the best of {args.repeats} after {args.warmup} warmup; peak = peak RSS minus "
              f"RSS after imports; work = peak RSS minus RSS once the layer and optimizer "
              f"state are built; x = ours / PEER-pytorch")
        print(_table(results))


if __name__ == "__main__":
    main()
