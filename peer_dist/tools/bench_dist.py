"""peer-bench dist: sharded expert strategies (fetch, dispatch) against replicated tables.

    peer-bench dist                            # launches itself with torchrun at 1, 2, 4 ranks
    peer-bench dist --nprocs-list 2,4 --num-experts 262144 --dim 256 --tokens 1024 --json

One PEER expert stage (the only part that communicates; routing is replicated and silent) per
rank: uniform random expert ids (T, h*k), random gates and inputs, forward + backward +
gradient sync, timed over --steps after --warmup. Rows per strategy and world size:
  step_s                          median step time, slowest rank
  bytes_per_token_layer           bytes sent to other ranks per token, fwd + bwd, mean over
                                  ranks (fetch / dispatch: counted at all_to_all_single;
                                  replicated: the ring all-reduce volume 2(W-1)/W of the dense
                                  U, V gradients handed to all_reduce)
  bytes_per_token_layer_predicted the cost model (parallel/cost.py) for uniform ids
  expert_mem_bytes_per_rank       bytes of the local U and V rows (parameters only; gradients
                                  and optimizer state scale the same way)
A model-only row at the paper's scale (N=1024^2, d=1024, h=8, k=16, 4096 tokens, EP=8) closes
the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from peer_dist.config import STRATEGIES

PAPER = dict(num_experts=1024 ** 2, dim=1024, heads=8, topk=16, tokens=4096, ep=8)

# The sharded strategies (the config's list, less auto) and the replicated-table baseline.
ROWS = (*(s for s in STRATEGIES if s != "auto"), "replicated")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="peer-bench dist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs-list", default="1,2,4", help="world sizes to launch (torchrun)")
    p.add_argument("--num-experts", type=int, default=512 ** 2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step")
    p.add_argument("--ep", type=int, default=0, help="0 = the whole world")
    p.add_argument("--strategies", default="fetch,dispatch,replicated")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank; 0 = cores/W")
    p.add_argument("--json", action="store_true", help="one JSON object per line and row")
    p.add_argument("--no-paper", action="store_true", help="leave out the model-only paper row")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [s for s in args.strategies.split(",") if s not in ROWS]
    if bad:
        p.error(f"--strategies: {bad} invalid; allowed are {', '.join(ROWS)}")
    try:
        sizes = [int(s) for s in args.nprocs_list.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        p.error(f"--nprocs-list={args.nprocs_list!r} is invalid: allowed are world sizes >= 1, "
                "comma-separated, e.g. 1,2,4")
    return args


# ---------------------------------------------------------------- worker (under torchrun)

def _inputs(args: argparse.Namespace, rank: int, step: int, device: torch.device):
    g = torch.Generator().manual_seed(1000 * step + rank)
    s = args.heads * args.topk
    ids = torch.randint(0, args.num_experts, (args.tokens, s), generator=g)
    gates = torch.randn(args.tokens, args.heads, args.topk, generator=g).softmax(-1)
    x = torch.randn(args.tokens, args.dim, generator=g)
    return (x.to(device).requires_grad_(True), ids.to(device),
            gates.view(args.tokens, s).to(device).requires_grad_(True))


def _sharded_step(layer, args, rank: int, step: int, device) -> None:
    from peer_dist.parallel.grad_sync import sync_layer_grads

    x, ids, gates = _inputs(args, rank, step, device)
    layer(x, ids, gates).square().mean().backward()
    sync_layer_grads(layer)
    layer.shard.u.grad = layer.shard.v.grad = None


def _replicated_step(tables, args, rank: int, step: int, device) -> float:
    import torch.distributed as dist

    from peer_dist.ops import peer_mix

    x, ids, gates = _inputs(args, rank, step, device)
    y = peer_mix(x, ids, gates, tables[0], tables[1], "gelu", sparse_grad=False)
    y.square().mean().backward()
    sent = 0.0
    world = dist.get_world_size()
    for t in tables:  # what DDP would do with dense table gradients
        if world > 1:
            dist.all_reduce(t.grad)
            sent += 2.0 * (world - 1) / world * t.grad.numel() * t.grad.element_size()
        t.grad = None
    return sent


def _build(strategy: str, args, topo):
    from peer_dist.model.peer import ExpertTables, init_rows
    from peer_dist.parallel.store import ShardedExperts

    tables = ExpertTables(args.num_experts, args.dim, "gelu", seed=1)
    if strategy == "replicated":
        su, sv = tables.table_seeds()
        return [init_rows(s, 0, args.num_experts, args.dim, tables.std).to(topo.device)
                .requires_grad_(True) for s in (su, sv)]
    return ShardedExperts("bench", tables, topo, strategy)


def _measure(strategy: str, args, topo) -> dict:
    import torch.distributed as dist

    from peer_dist.parallel import cost

    layer = _build(strategy, args, topo)
    times, sent = [], 0.0
    for step in range(args.warmup + args.steps):
        if strategy != "replicated":
            layer.stats.reset()
        dist.barrier()
        t0 = time.perf_counter()
        if strategy == "replicated":
            sent = _replicated_step(layer, args, topo.rank, step, topo.device)
        else:
            _sharded_step(layer, args, topo.rank, step, topo.device)
            sent = float(sum(layer.stats.bytes_sent.values()))
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    agg = torch.tensor([statistics.median(times), sent], dtype=torch.float64)
    slowest = agg[:1].clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(agg)
    shape = cost.LayerShape(args.num_experts, args.dim, args.heads * args.topk, args.tokens,
                            topo.ep, topo.world_size)
    mem = (2 * layer[0].numel() * 4 if strategy == "replicated"
           else 2 * layer.shard.rows * args.dim * 4)
    return _row(strategy, topo.world_size, topo.ep, args, step_s=float(slowest),
                measured=float(agg[1]) / (topo.world_size * args.tokens),
                predicted=cost.predict_per_token(shape)[strategy], mem=mem)


def _row(strategy: str, world: int, ep: int, args, step_s, measured, predicted, mem,
         source: str = "measured") -> dict:
    return dict(strategy=strategy, world_size=world, ep=ep, num_experts=args.num_experts,
                dim=args.dim, heads=args.heads, topk=args.topk, tokens_per_rank=args.tokens,
                step_s=step_s, bytes_per_token_layer=measured,
                bytes_per_token_layer_predicted=predicted, expert_mem_bytes_per_rank=mem,
                source=source)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from peer_dist.parallel.topology import Topology, init_distributed

    init_distributed()
    world = dist.get_world_size()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    topo = Topology.build(args.ep)
    for strategy in args.strategies.split(","):
        row = _measure(strategy, args, topo)
        if topo.rank == 0:
            print(json.dumps(row), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------- launcher and report

def launch(args: argparse.Namespace, argv: list[str], nprocs: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nprocs}", "-m", "peer_dist.tools.bench_dist", "--worker", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"peer-bench dist: torchrun with {nprocs} ranks failed "
                         f"(exit {out.returncode})")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def paper_rows() -> list[dict]:
    from peer_dist.parallel import cost

    a = argparse.Namespace(**{k: PAPER[k] for k in ("num_experts", "dim", "heads", "topk")},
                           tokens=PAPER["tokens"])
    shape = cost.LayerShape(PAPER["num_experts"], PAPER["dim"], PAPER["heads"] * PAPER["topk"],
                            PAPER["tokens"], PAPER["ep"], PAPER["ep"])
    pred = cost.predict_per_token(shape)
    rows = []
    for strategy in ROWS:
        ep = 1 if strategy == "replicated" else PAPER["ep"]
        mem = cost.table_bytes_per_rank(PAPER["num_experts"], PAPER["dim"], ep)
        rows.append(_row(strategy, PAPER["ep"], PAPER["ep"], a, None, None, pred[strategy], mem,
                         source="model"))
    return rows


def _fmt(v, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v / scale:,.{digits}f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'source':8} {'strategy':10} {'W':>2} {'EP':>2} {'N':>8} {'d':>5} {'T/rank':>6} "
            f"{'step ms':>8} {'KB/tok meas':>12} {'KB/tok model':>12} {'meas/model':>10} "
            f"{'table MB/rank':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        m, p = r["bytes_per_token_layer"], r["bytes_per_token_layer_predicted"]
        ratio = "-" if not m or not p else f"{m / p:.3f}"
        print(f"{r['source']:8} {r['strategy']:10} {r['world_size']:>2} {r['ep']:>2} "
              f"{r['num_experts']:>8} {r['dim']:>5} {r['tokens_per_rank']:>6} "
              f"{_fmt(r['step_s'], 1e-3):>8} {_fmt(m, 1e3, 2):>12} {_fmt(p, 1e3, 2):>12} "
              f"{ratio:>10} {_fmt(r['expert_mem_bytes_per_rank'], 1e6):>13}")
    print()
    for line in ratios(rows):
        print(line)


def ratios(rows: list[dict]) -> list[str]:
    """replicated / dispatch bytes per (source, world) and table memory relative to EP=1."""
    out = []
    key = "bytes_per_token_layer"
    for (src, w) in sorted({(r["source"], r["world_size"]) for r in rows}):
        by = {r["strategy"]: r for r in rows if r["source"] == src and r["world_size"] == w}
        if "dispatch" in by and "replicated" in by:
            k = key if src == "measured" else key + "_predicted"
            d, rep = by["dispatch"][k], by["replicated"][k]
            if d and rep:
                out.append(f"{src} W={w}: replicated / dispatch bytes = {rep / d:,.1f}x")
    base = {r["strategy"]: r["expert_mem_bytes_per_rank"] for r in rows
            if r["source"] == "measured" and r["ep"] == 1}
    for r in rows:
        if r["source"] == "measured" and r["ep"] > 1 and base.get(r["strategy"]):
            if r["strategy"] != "replicated":
                share = r["expert_mem_bytes_per_rank"] / base[r["strategy"]]
                out.append(f"table memory {r['strategy']} EP={r['ep']} / EP=1 = {share:.1%}")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        worker(args)
        return
    rows = []
    if "TORCHELASTIC_RUN_ID" in os.environ:  # already under torchrun: this world only
        raise SystemExit("peer-bench dist launches torchrun itself; run it without torchrun "
                         "(or pass --worker for one world size)")
    passthrough = [a for a in argv if a != "--json"]
    for n in (int(s) for s in args.nprocs_list.split(",") if s):
        rows += launch(args, passthrough, n)
    if not args.no_paper:
        rows += paper_rows()
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
