"""peer-bench dist: sharded expert strategies (fetch, dispatch, node_dispatch) against
replicated tables.

    peer-bench dist                            # launches itself with torchrun at 1, 2, 4 ranks
    peer-bench dist --nprocs-list 2,4 --num-experts 262144 --dim 256 --tokens 1024 --json
    peer-bench dist --nodes 2 --nprocs-list 2,4   # each world as two torchrun agents ("nodes")
    peer-bench dist --nprocs-list 2 --overlap-chunks 1,4   # unchunked and 4 chunks side by side
    peer-bench dist --nprocs-list 1,2 --rounds 5   # 1,2,1,2,...: medians of 5 rounds

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
  bytes_internode_per_token_layer the part of bytes_per_token_layer sent to ranks on other nodes
  (and _predicted; bytes_intranode_per_token_layer the rest; replicated: the ring's crossings)
  step_s_predicted                the step-time model (tools/cluster_model.py) with this
                                  machine's constants, measured in each world: the mix's speed
                                  (at the strategy's shape), its grouping of the selections and
                                  the gradient sync's over a shard (every rank at once, so ranks
                                  sharing cores show it; just before and just after each
                                  strategy's steps, averaged), a streaming add's bandwidth, the
                                  rates of zeroing new buffers (dense gradients) and of
                                  gathering random rows into them (fetch's owner), the
                                  all-to-all's latency between compute phases and bandwidth
                                  (into new buffers, as the strategies receive) and the
                                  in-place all-reduce's bandwidth (the replicated baseline);
                                  model_constants holds them
  collectives_per_step            all-to-alls (replicated: all-reduces) of a step, counted at
                                  the collectives (and _predicted: the model's count)
  comm_exposed_s                  seconds a step spent in or waiting on transfers (slowest
                                  rank's median): with --overlap-chunks C > 1 (fetch and
                                  dispatch; column C) only the waits on transfers that ran
                                  under compute, i.e. what overlap did not hide
With --rounds R the world sizes run R times in turn (1, 2, 1, 2, ...: a shared machine's load
drifts between launches, and a ratio of two launches moves with it): each row is the round
with the median step time (step_s_rounds holds them all), and each ratio against W = 1 is the
median of the rounds' own ratios, with their range.
With --interleave, at W > 1 the strategy's one-rank step (the whole table, no exchange) also
runs between the world's steps: on rank 0 while the other ranks wait (solo_step_s), then on
every rank at once (the slowest rank's: solo_all_step_s), and the ratios of the world's step to
them, measured at the same moments (a drifting machine moves all three). The second keeps the
other ranks' cores busy as the world does: against it, what sharing the machine's memory and
caches costs drops out and the exchange and its waits remain.
With --nodes M each world runs as M torchrun agents on this machine (LOCAL_WORLD_SIZE = W / M):
the ranks see M nodes, and node_dispatch joins the strategies.
A model-only row at the paper's scale (N=1024^2, d=1024, h=8, k=16, 4096 tokens, EP=8) closes
the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

from peer_dist import cli
from peer_dist.config import MAX_OVERLAP_CHUNKS, OVERLAPPING, STRATEGIES
from peer_dist.errors import UserError
from peer_dist.tools.bench import add_shape_args, memory_error, shape_error
from peer_dist.train.startup import local_ranks_error

PAPER = dict(num_experts=1024 ** 2, dim=1024, heads=8, topk=16, tokens=4096, ep=8)

# Strategies whose chunks' table gradients are summed in the backward (dispatch.sum_chunk_grads)
MERGED = ("dispatch", "node_dispatch")
# The sharded strategies (the config's list, less auto) and the replicated-table baseline.
ROWS = (*(s for s in STRATEGIES if s != "auto"), "replicated")



def parse(argv: list[str]) -> argparse.Namespace:
    """The flags, every one checked here, before any torchrun starts (a bad value is one line
    and status 2, not a failed launch per world size)."""
    p = cli.Parser(prog="peer-bench dist", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs-list", default="1,2,4", help="world sizes to launch (torchrun)")
    add_shape_args(p, num_experts=512 ** 2, dim=256)
    p.add_argument("--tokens", type=cli.COUNT, default=1024, help="tokens per rank per step")
    p.add_argument("--ep", type=cli.ints(0, cli.MAX_COUNT), default=0,
                   help="0 = the whole world; else a divisor of every world size")
    p.add_argument("--strategies", default=None,
                   help="default fetch,dispatch,replicated (and node_dispatch with --nodes > 1)")
    p.add_argument("--nodes", type=cli.COUNT, default=1,
                   help="torchrun agents per world size (dividing every world size)")
    p.add_argument("--overlap-chunks", default="1",
                   help="chunks whose transfers run under compute "
                        "(parallel.overlap_chunks), comma-separated to measure several side by "
                        "side, e.g. 1,4 (replicated runs unchunked)")
    p.add_argument("--steps", type=cli.COUNT, default=4)
    p.add_argument("--warmup", type=cli.ints(0, cli.MAX_COUNT), default=1)
    p.add_argument("--interleave", action="store_true",
                   help="at W > 1, the strategy's one-rank step also runs between the "
                        "world's steps, on rank 0 alone (the other ranks waiting: solo_step_s) "
                        "and on every rank at once (the slowest: solo_all_step_s), and the "
                        "ratios to them measured at the same moments")
    p.add_argument("--rounds", type=cli.COUNT, default=1,
                   help="run the world sizes this many times in turn; medians (default 1)")
    p.add_argument("--threads", type=cli.ints(0, cli.MAX_THREADS), default=0,
                   help="torch threads per rank; 0 = cores/W")
    p.add_argument("--json", action="store_true", help="one JSON object per line and row")
    p.add_argument("--no-paper", action="store_true", help="leave out the model-only paper row")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        problem = _problem(args)
    except UserError as e:  # PEER_BACKEND set to something else than nccl or gloo
        problem = str(e)
    if problem:
        p.error(problem)
    return args


def _problem(args: argparse.Namespace) -> str | None:
    """The one-line error for flags valid one by one but not together (or not on this
    machine), None when every world can start; sets args.sizes, chunk_list, strategies."""
    sizes = _int_list(args.nprocs_list)
    if not sizes or min(sizes) < 1:
        return (f"--nprocs-list={args.nprocs_list!r} is invalid: allowed are world sizes >= 1, "
                "comma-separated, e.g. 1,2,4")
    too_many = None if args.worker else local_ranks_error(max(sizes), "--nprocs-list")
    if too_many:  # every world's ranks run on this machine, --nodes or not
        return too_many
    args.sizes = sizes
    if any(w % args.nodes for w in sizes):
        return (f"--nodes={args.nodes} with --nprocs-list={args.nprocs_list} is invalid: allowed "
                "is a node count >= 1 that divides every world size")
    if args.ep and any(w % args.ep for w in sizes):
        common = math.gcd(*sizes)
        return (f"--ep={args.ep} with --nprocs-list={args.nprocs_list} is invalid: allowed are 0 "
                f"(the whole world) or a divisor of every world size: "
                f"{[d for d in range(1, common + 1) if common % d == 0]}")
    if args.strategies is None:
        args.strategies = ",".join(s for s in ROWS if args.nodes > 1 or s != "node_dispatch")
    names = cli.items(args.strategies) or [""]
    if not all(s in ROWS for s in names):
        return (f"--strategies={args.strategies!r} is invalid: allowed are {', '.join(ROWS)}, "
                "comma-separated")
    if args.nodes == 1 and "node_dispatch" in names:
        return (f"--strategies={args.strategies!r} with --nodes=1 is invalid: node_dispatch "
                "needs --nodes >= 2 (one node: it is dispatch)")
    bad = shape_error(args.num_experts, args.heads, args.topk)
    if bad:
        return bad
    args.chunk_list = _int_list(args.overlap_chunks)
    most = min(args.tokens, MAX_OVERLAP_CHUNKS)
    if not args.chunk_list or not 1 <= min(args.chunk_list) <= max(args.chunk_list) <= most:
        return (f"--overlap-chunks={args.overlap_chunks!r} is invalid: allowed are integers from 1 "
                f"(no overlap) to {most} (--tokens={args.tokens}, and at most "
                f"{MAX_OVERLAP_CHUNKS} as parallel.overlap_chunks), comma-separated, e.g. 1,4")
    args.overlap_chunks = args.chunk_list[0]
    if args.worker:
        return None
    # what each rank holds at least: U and V whole where the table is replicated (or
    # --interleave's one-rank step runs), else its shard; and its activations
    from peer_dist.parallel.topology import pick_backend

    full = 2 * args.num_experts * args.dim * 4
    whole = "replicated" in names or args.interleave
    acts = args.tokens * (16 * args.dim + 12 * args.heads * args.topk)  # x, y, grads; ids, gates
    flags = (f"--num-experts={args.num_experts} --dim={args.dim} --tokens={args.tokens} "
             f"--nprocs-list={args.nprocs_list}")
    if pick_backend() == "nccl":  # a GPU per rank
        need = max(full if whole else -(-full // w) for w in sizes) + acts
        return memory_error(flags, "a rank's tables and activations", need, "cuda")
    need = max(w * (max(full if whole else 0, -(-full // w)) + acts) for w in sizes)
    return memory_error(flags, "the ranks' tables and activations", need, "cpu")


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in cli.items(text) or ()]
    except ValueError:
        return []


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
    return ShardedExperts("bench", tables, topo, strategy, overlap_chunks=_chunks(strategy, args))


def _measure(strategy: str, args, topo) -> dict:
    import torch.distributed as dist

    layer = _build(strategy, args, topo)
    # --interleave: between the world's steps, rank 0 runs the one-rank step alone (the other
    # ranks waiting), then every rank runs its own at once, so the ratio to one rank is
    # measured at the same moments, without and with the other ranks' cores busy
    interleave = args.interleave and topo.world_size > 1 and strategy != "replicated"
    alone = _build(_solo_strategy(strategy), args, solo_topology(topo)) if interleave else None
    times, waits, solo, solo_all, sent, far = [], [], [], [], 0.0, 0.0
    for step in range(args.warmup + args.steps):
        if strategy != "replicated":
            layer.stats.reset()
        dist.barrier()
        t0 = _now(topo.device)
        if strategy == "replicated":
            sent = _replicated_step(layer, args, topo.rank, step, topo.device)
            far = sent * _ring_crossing(topo)
        else:
            _sharded_step(layer, args, topo.rank, step, topo.device)
            sent = float(sum(layer.stats.bytes_sent.values()))
            far = float(sum(layer.stats.bytes_internode.values()))
        if step >= args.warmup:
            times.append(_now(topo.device) - t0)
            waits.append(0.0 if strategy == "replicated" else layer.stats.seconds)
        if interleave:
            for everyone, got in ((False, solo), (True, solo_all)):
                dist.barrier()
                if everyone or topo.rank == 0:
                    t0 = _now(topo.device)
                    _sharded_step(alone, args, topo.rank, step, topo.device)
                    if step >= args.warmup:
                        got.append(_now(topo.device) - t0)
    slowest = _reduce([statistics.median(times), statistics.median(waits)]
                      + ([statistics.median(solo_all)] if interleave else []), topo.device)
    agg = _reduce([statistics.median(times), sent, far], topo.device, "sum")
    mem = (2 * layer[0].numel() * 4 if strategy == "replicated"
           else 2 * layer.shard.rows * args.dim * 4)
    per = topo.world_size * args.tokens
    row = _row(strategy, topo.world_size, topo.ep, args, step_s=float(slowest[0]),
               measured=float(agg[1]) / per, mem=mem, nodes=topo.nodes)
    row["bytes_internode_per_token_layer"] = float(agg[2]) / per
    row["bytes_intranode_per_token_layer"] = (float(agg[1]) - float(agg[2])) / per
    # seconds a step spent in (or waiting on) transfers: what overlap did not hide
    row["comm_exposed_s"] = float(slowest[1])
    row["overlap_chunks"] = _chunks(strategy, args)
    if interleave:  # one-rank steps between the world's: rank 0's alone (the rows come from
        # rank 0), and the slowest rank's with every rank running its own at once
        row["solo_step_s"] = statistics.median(solo) if solo else None
        row["solo_all_step_s"] = float(slowest[2])
    # all-to-alls (or all-reduces) of the last step, counted at the collectives, and the
    # model's count (a latency each)
    row["collectives_per_step"] = (2 * (topo.world_size > 1) if strategy == "replicated"
                                   else layer.stats.collectives)
    row["collectives_per_step_predicted"] = 0 if topo.world_size == 1 else _model_calls(
        strategy, topo, args)
    return row


def _model_calls(strategy: str, topo, args) -> int:
    from peer_dist.tools import cluster_model as cm

    return 0 if topo.ep == 1 and strategy != "replicated" else cm.collectives(
        strategy, _chunks(strategy, args))


def _solo_strategy(strategy: str) -> str:
    """The one-rank run of a strategy (one rank is one node: node_dispatch is dispatch)."""
    return "dispatch" if strategy == "node_dispatch" else strategy


def solo_topology(topo):
    """A world of one (this rank, its device) inside a larger one: a layer built on it makes
    no collective (its exchanges have one member, its gradients one replica)."""
    from peer_dist.parallel.topology import Topology

    return Topology(rank=0, world_size=1, ep=1, dp=1, ep_rank=0, dp_rank=0, ep_group=None,
                    dp_group=None, device=topo.device, mesh=None, backend=topo.backend,
                    local_world_size=1, ep_nodes=(0,))


def _ring_crossing(topo) -> float:
    """Share of a rank-order ring's hops that leave a node (what the replicated baseline's
    all-reduce sends across nodes, in the model's ring)."""
    return topo.nodes / topo.world_size if topo.nodes > 1 else 0.0


def _shape(args, world: int, ep: int, nodes: int):
    from peer_dist.parallel import cost

    return cost.LayerShape(args.num_experts, args.dim, args.heads * args.topk, args.tokens,
                           ep, world, ranks_per_node=world // nodes)


def _predicted_step(strategy: str, args, topo, consts: dict) -> float | None:
    """The step-time model with this machine's measured constants (None without them)."""
    from peer_dist.tools import cluster_model as cm

    if not consts.get("mix_s_per_token"):
        return None
    layer = cm.Layer(args.num_experts, args.dim, args.heads * args.topk, args.tokens, elem=4,
                     optimizer=False)
    # the mix's measured speed, written as a bandwidth over the bytes the model says it streams
    rate = cm.mix_bytes(layer) / consts["mix_s_per_token"]
    a2a = consts.get("a2a_bytes_per_s") or 1.0
    c = cm.Cluster(topo.nodes, topo.world_size // topo.nodes, rate, a2a, a2a, 0.0,
                   hbm_fraction=1.0, latency_s=consts.get("collective_s", 0.0),
                   stream_bytes_per_s=consts.get("stream_bytes_per_s", 0.0),
                   fresh_bytes_per_s=consts.get("fresh_bytes_per_s", 0.0),
                   gather_bytes_per_s=consts.get("gather_bytes_per_s", 0.0),
                   sync_bytes_per_s=_sync_rate(args, topo, consts),
                   sync_fetch_bytes_per_s=_sync_rate(args, topo, consts, "fetch"),
                   allreduce_bytes_per_s=consts.get("allreduce_bytes_per_s", 0.0),
                   plan_s_per_selection=consts.get("plan_s_per_selection", 0.0),
                   name="this machine")  # core sharing is in the measured constants
    return cm.predict_step(layer, c, topo.ep, strategy, _chunks(strategy, args))[
        "step_s_predicted"]


def _sync_rate(args, topo, consts: dict, strategy: str = "local") -> float:
    """The probe's measured sync seconds as a rate over the bytes the model says it streams
    (probe_mix: no DP, over a shard's rows; T*S selections in order,
    or for fetch one row gradient per served row). 0 where the model counts no bytes (one
    rank, rows in order: nothing to price)."""
    from peer_dist.tools import cluster_model as cm

    key = "sync_fetch_s" if strategy == "fetch" else "sync_s"
    if not consts.get(key):
        return 0.0
    probe = cm.Layer(-(-args.num_experts // topo.ep), args.dim, args.heads * args.topk,
                     args.tokens, elem=4, optimizer=False)
    if strategy == "fetch":  # the whole layer's distinct rows, served by the shard's owner
        full = cm.Layer(args.num_experts, args.dim, args.heads * args.topk, args.tokens,
                        elem=4, optimizer=False)
        return cm.sync_bytes(full, topo.ep, "fetch") / consts[key]
    return cm.sync_bytes(probe, 1, "local") / consts[key]


def _chunks(strategy: str, args) -> int:
    """The chunks a strategy's steps ran with (the others run unchunked)."""
    return args.overlap_chunks if strategy in OVERLAPPING else 1


def _row(strategy: str, world: int, ep: int, args, step_s, measured, mem, nodes: int = 1,
         source: str = "measured") -> dict:
    """A row with the cost model's bytes for uniform ids beside what was measured."""
    from peer_dist.parallel import cost

    intra, inter = cost.predict_by_link(_shape(args, world, ep, nodes))[strategy]
    return dict(strategy=strategy, world_size=world, ep=ep, nodes=nodes,
                num_experts=args.num_experts, dim=args.dim, heads=args.heads, topk=args.topk,
                tokens_per_rank=args.tokens, step_s=step_s, bytes_per_token_layer=measured,
                bytes_per_token_layer_predicted=intra + inter,
                bytes_internode_per_token_layer=None,
                bytes_internode_per_token_layer_predicted=inter,
                bytes_intranode_per_token_layer=None,
                bytes_intranode_per_token_layer_predicted=intra,
                step_s_predicted=None, expert_mem_bytes_per_rank=mem, source=source)


def _now(device: torch.device) -> float:
    """The clock, once the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _reduce(values: list[float], device: torch.device, op: str = "max") -> list[float]:
    """values, the max (or sum) over the ranks: float64 on the backend's device (NCCL reduces
    CUDA tensors only)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def probe_links(topo, sizes: tuple[int, int] = (256, 1 << 23), reps: int = 3) -> dict:
    """All-to-all latency and bandwidth of this world: equal splits of two sizes (float32
    elements per peer; the larger one 32 MiB, the size of fetch's messages at the default
    shape), median of reps; bandwidth = bytes one rank sends per second. Each call receives
    into a new buffer, as Exchange.send does (on a CPU the first touch of fresh pages costs
    more than the transfer: 2.5x the time into a reused buffer, measured on 2 cores); and the
    replicated baseline's in-place all-reduce (probe_allreduce)."""
    import torch.distributed as dist

    if topo.world_size == 1:
        return {}
    out = []
    for n in sizes:
        x = torch.zeros(topo.world_size * n, device=topo.device)
        times = []
        for _ in range(reps + 1):
            dist.barrier()
            t0 = _now(topo.device)
            dist.all_to_all_single(torch.empty_like(x), x)
            times.append(_now(topo.device) - t0)
        out += _reduce([statistics.median(times[1:])], topo.device)
    sent = [(topo.world_size - 1) * n * 4 for n in sizes]
    bw = (sent[1] - sent[0]) / max(out[1] - out[0], 1e-9)
    return {"a2a_latency_s": out[0], "a2a_bytes_per_s": bw,
            "allreduce_bytes_per_s": probe_allreduce(topo), "collective_s": probe_collective(topo)}


def probe_collective(topo, reps: int = 20) -> float:
    """Seconds a small all-to-all costs between compute phases, as a step's collectives sit
    (ranks arrive apart, more so when they share cores; a barrier before each call, as in
    probe_links, hides that): the slowest rank's time of reps x (work + all-to-all) less reps
    x work alone, every rank at once; work = four adds over 16 MiB buffers (a few ms)."""
    import torch.distributed as dist

    a, b = (torch.ones(4 << 20, device=topo.device) for _ in range(2))
    out = torch.empty_like(a)
    x = torch.zeros(topo.world_size * 256, device=topo.device)
    y = torch.empty_like(x)
    spent = []
    for talk in (False, True):
        dist.barrier()
        t0 = _now(topo.device)
        for _ in range(reps):
            for _ in range(4):
                torch.add(a, b, out=out)
            if talk:
                dist.all_to_all_single(y, x)
        spent.append(_now(topo.device) - t0)
    alone, talking = _reduce(spent, topo.device)
    return max((talking - alone) / reps, 0.0)


def probe_allreduce(topo, sizes: tuple[int, int] = (1 << 20, 1 << 24), reps: int = 2) -> float:
    """Ring bytes per second (2 (W-1)/W of the buffer, what the replicated row counts as sent)
    of an in-place all-reduce of float32 buffers of two sizes (4 and 64 MiB: larger than any
    cache, as the tables' 256 MiB gradients), slowest rank, every rank at once: the replicated
    baseline's dense-gradient all-reduce."""
    import torch.distributed as dist

    out = []
    for n in sizes:
        x = torch.ones(n, device=topo.device)
        times = []
        for _ in range(reps + 1):
            dist.barrier()
            t0 = _now(topo.device)
            dist.all_reduce(x)
            times.append(_now(topo.device) - t0)
        out += _reduce([statistics.median(times[1:])], topo.device)
    ring = 2.0 * (topo.world_size - 1) / topo.world_size * 4
    return ring * (sizes[1] - sizes[0]) / max(out[1] - out[0], 1e-9)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from peer_dist.parallel.topology import Topology, init_distributed

    init_distributed()
    world = dist.get_world_size()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    topo = Topology.build(args.ep)
    links = {**probe_links(topo), "stream_bytes_per_s": probe_stream(topo),
             "fresh_bytes_per_s": probe_fresh(topo)}
    for strategy in cli.items(args.strategies):
        if strategy == "node_dispatch" and topo.nodes == 1:
            continue  # one node: dispatch with more counts
        for chunks in args.chunk_list if strategy in OVERLAPPING else [1]:
            run = argparse.Namespace(**{**vars(args), "overlap_chunks": chunks})
            # probed just before and just after the strategy's steps, and the two averaged: a
            # shared machine's speed drifts within a minute
            before = probe_mix_world(run, topo, strategy)
            row = _measure(strategy, run, topo)
            after = probe_mix_world(run, topo, strategy)
            consts = {**{k: (before[k] + after[k]) / 2 for k in before}, **links}
            row["step_s_predicted"] = _predicted_step(strategy, run, topo, consts)
            row["model_constants"] = consts  # what the prediction used, measured in this world
            if topo.rank == 0:
                print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without C++ destructors: a gloo thread still joinable at exit aborts the process
    # ("terminate called without an active exception") after the rows were printed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def served_rows(args: argparse.Namespace, rows: int, ep: int, g: torch.Generator) -> torch.Tensor:
    """What fetch's owner serves per step from a shard of `rows` rows: each of the EP group's
    members asks for its share of its distinct rows (R / EP, the model's count), ascending
    within a member's block, as plan_fetch sends them."""
    from peer_dist.tools import cluster_model as cm

    layer = cm.Layer(args.num_experts, args.dim, args.heads * args.topk, args.tokens, elem=4,
                     optimizer=False)
    each = min(rows, round(cm.distinct_rows(layer) / ep))
    return torch.cat([torch.randperm(rows, generator=g)[:each].sort().values
                      for _ in range(ep)])


def probe_mix(args: argparse.Namespace, rows: int, ep: int = 1, reps: int = 3,
              bags_per_token: float = 1.0, device: torch.device | str = "cpu",
              chunks: int = 1) -> dict:
    """One rank's step without messages over a table of `rows` rows (its shard), timed in
    parts, each priced apart by the model:
    - the mix, forward + backward with sparse table gradients, per token and per rep's two
      phases, at the shape the strategy's mix runs: bags_per_token > 1 is dispatch's owner,
      whose T*S selections come as T*m bags, one per (token, owner) pair (m: the owners a
      token touches; at W = 2 twice the bags of half the size); chunks > 1, one mix per
      chunk of bags with its own table gradients, as the overlapped strategies run it (their
      sum is the model's merge term);
    - the gradient sync's own code on them (the rows' order checked; no DP: nothing travels);
    - dispatch's grouping of the selections by (owner, token) (group_pairs: a sort);
    - fetch's owner's two phases at its shape, which run at other rates per byte (rows at
      random from the whole shard: a page and a TLB miss per row): the served rows gathered
      (u[served], v[served]) and the sync of the row gradients that come back, one per
      served row."""
    from types import SimpleNamespace

    from peer_dist.model.peer import ExpertTables, init_rows
    from peer_dist.ops import peer_mix, ragged_mix
    from peer_dist.parallel.dispatch import group_pairs, sum_chunk_grads
    from peer_dist.parallel.grad_sync import sync_layer_grads

    tables = ExpertTables(args.num_experts, args.dim, "gelu", seed=1)
    device = torch.device(device)
    u, v = (init_rows(s, 0, rows, args.dim, tables.std).to(device).requires_grad_(True)
            for s in tables.table_seeds())
    alone = SimpleNamespace(topo=SimpleNamespace(dp=1, world_size=1),
                            shard=SimpleNamespace(params=lambda: [u, v]))
    g = torch.Generator().manual_seed(7)
    times: dict[str, list[float]] = {"mix": [], "sync": [], "gather": [], "sync_fetch": [],
                                     "plan": [], "fwd": [], "bwd": []}
    for step in range(reps + 1):
        x, ids, gates = _inputs(args, 0, step, device)
        bags = max(1, round(args.tokens * bags_per_token))
        q = ids.numel()
        if bags_per_token > 1:  # the owner's bags: x per pair, the selections split evenly
            x = torch.randn(bags, args.dim, generator=g).to(device).requires_grad_(True)
        bag = torch.arange(q, device=device) * bags // q
        t0 = _now(device)
        if chunks > 1:
            parts = _chunk_mixes(x, ids.reshape(-1) % rows, bag, gates.reshape(-1), u, v,
                                 1.0 / ep, chunks)
        elif bags_per_token > 1:
            y = ragged_mix(x, ids.reshape(-1) % rows, bag, gates.reshape(-1), u, v, "gelu",
                           table_scale=1.0 / ep)
        else:
            y = peer_mix(x, ids % rows, gates, u, v, "gelu", sparse_grad=True)
        tf = _now(device)  # chunked: forward and backward of each chunk in turn, one phase
        if chunks <= 1:
            y.square().mean().backward()
        t1 = _now(device)
        if chunks > 1:  # the chunks' sum (priced apart by the model: merge_bytes)
            u.grad, v.grad = (sum_chunk_grads(p) for p in parts)
        sync_layer_grads(alone)
        t2 = _now(device)
        served = served_rows(args, rows, ep, g).to(device)
        t3 = _now(device)
        got = [t.detach()[served] for t in (u, v)]
        t4 = _now(device)
        for t, rows_of in zip((u, v), got, strict=True):  # as LookupRows.backward makes them
            t.grad = torch.sparse_coo_tensor(served[None], rows_of, t.shape,
                                             check_invariants=False)
        t5 = _now(device)
        sync_layer_grads(alone)
        t6 = _now(device)
        # dispatch's grouping of the T*S selections by (owner, token): plan_dispatch's
        token = torch.arange(args.tokens, device=device).repeat_interleave(ids.shape[1])
        flat = ids.reshape(-1)
        group_pairs(flat % ep, flat % rows, token, args.tokens, ep)
        t7 = _now(device)
        for k, dt in (("mix", t1 - t0), ("sync", t2 - t1), ("gather", t4 - t3),
                      ("sync_fetch", t6 - t5), ("plan", t7 - t6), ("fwd", tf - t0),
                      ("bwd", t1 - tf)):
            times[k].append(dt)
        u.grad = v.grad = None
    med = {k: statistics.median(t[1:]) for k, t in times.items()}
    return {"mix_s_per_token": med["mix"] / args.tokens, "sync_s": med["sync"],
            "gather_s": med["gather"], "sync_fetch_s": med["sync_fetch"],
            "plan_s_per_selection": med["plan"] / ids.numel(),
            "served_rows": int(served.numel()),
            # each rep's forward and backward seconds (the warm-up left out)
            "mix_phases": [[f, b] for f, b in zip(times["fwd"][1:], times["bwd"][1:],
                                                   strict=True)]}


def _chunk_mixes(x, rows, bag, gates, u, v, table_scale: float, chunks: int):
    """The mix over `chunks` contiguous ranges of bags, forward + backward each, as the
    overlapped dispatch runs it: per table, each chunk's row gradients (unsummed)."""
    from peer_dist.ops import ragged_mix
    from peer_dist.parallel.dispatch import chunk_bounds

    bounds = chunk_bounds(x.shape[0], chunks)
    cuts = torch.searchsorted(bag, torch.tensor([a for a, _ in bounds] + [x.shape[0]],
                                                device=bag.device)).tolist()
    parts: tuple[list, list] = ([], [])
    for (a, b), lo, hi in zip(bounds, cuts[:-1], cuts[1:], strict=True):
        if hi == lo:
            continue
        xs, gs = x[a:b].detach().requires_grad_(True), gates[lo:hi].detach().requires_grad_(True)
        y = ragged_mix(xs, rows[lo:hi], bag[lo:hi] - a, gs, u, v, "gelu",
                       table_scale=table_scale)
        for got, part in zip(torch.autograd.grad(y.square().mean(), [u, v]), parts,
                             strict=True):
            part.append(got)
    return parts


def probe_stream(topo, mib: int = 64, reps: int = 3) -> float:
    """Bytes per second one rank streams (an add of two buffers into a third: read 2, write
    1), every rank at once; the slowest rank's figure."""
    import torch.distributed as dist

    a, b = (torch.ones(mib << 18, device=topo.device) for _ in range(2))  # mib MiB of fp32
    out = torch.empty_like(a)
    dist.barrier()
    times = []
    for _ in range(reps + 1):
        t0 = _now(topo.device)
        torch.add(a, b, out=out)
        times.append(_now(topo.device) - t0)
    return 3 * a.numel() * 4 / _reduce([statistics.median(times[1:])], topo.device)[0]


def probe_fresh(topo, mib: int = 64, reps: int = 7) -> float:
    """Bytes per second one rank writes into new buffers (torch.zeros of mib MiB, the way
    gradients and gathered rows are made), every rank at once; the slowest rank's figure."""
    import torch.distributed as dist

    dist.barrier()
    times = []
    for _ in range(reps + 1):
        t0 = _now(topo.device)
        torch.zeros(mib << 18, device=topo.device)
        times.append(_now(topo.device) - t0)
    return (mib << 20) / _reduce([statistics.median(times[1:])], topo.device)[0]


def probe_mix_world(args: argparse.Namespace, topo, strategy: str = "fetch") -> dict:
    """probe_mix on every rank at once, over a shard's rows (the ranks share the cores as in
    the steps that follow), at the strategy's mix shape: the slowest rank's figures, the
    model's compute constants. The mix's: per rep, the slowest rank's forward plus the
    slowest rank's backward (a step's collectives sit between the two: whichever rank is
    slower in each phase holds the others), the median over the reps."""
    import torch.distributed as dist

    dist.barrier()
    got = probe_mix(args, -(-args.num_experts // topo.ep), topo.ep,
                    bags_per_token=mix_bags_per_token(args, topo.ep, strategy),
                    device=topo.device,
                    chunks=_chunks(strategy, args) if strategy in MERGED else 1)
    keys = ("sync_s", "gather_s", "sync_fetch_s", "plan_s_per_selection")
    out = dict(zip(keys, _reduce([got[k] for k in keys], topo.device), strict=True))
    phases = _reduce([t for rep in got["mix_phases"] for t in rep], topo.device)
    out["mix_s_per_token"] = statistics.median(
        f + b for f, b in zip(phases[0::2], phases[1::2], strict=True)) / args.tokens
    # fetch's gather as a rate: both tables' served rows per second
    out["gather_bytes_per_s"] = got["served_rows"] * 2 * args.dim * 4 / out.pop("gather_s")
    return out


def mix_bags_per_token(args: argparse.Namespace, ep: int, strategy: str) -> float:
    """Bags per token of a strategy's mix: dispatch's and node_dispatch's owners mix one bag
    per (token, owner) pair (the cost model's owners a token touches); fetch's requester and
    the replicated baseline mix one per token."""
    from peer_dist.parallel import cost

    if ep == 1 or strategy not in ("dispatch", "node_dispatch"):
        return 1.0
    return cost.LayerShape(args.num_experts, args.dim, args.heads * args.topk, args.tokens,
                           ep, ep).owners_touched()


# ---------------------------------------------------------------- launcher and report

def launch(args: argparse.Namespace, argv: list[str], nprocs: int) -> list[dict]:
    """One world of nprocs ranks as args.nodes torchrun agents on this machine (a static
    rendezvous on 127.0.0.1); the rows come from rank 0, on agent 0."""
    from peer_dist.parallel.topology import free_port

    per = nprocs // args.nodes
    if args.nodes == 1:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(args.nodes), "--master-addr", "127.0.0.1", "--master-port",
                 str(free_port())]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    procs = []
    for node in range(args.nodes):
        rank = [] if args.nodes == 1 else ["--node-rank", str(node)]
        cmd = [sys.executable, "-m", "torch.distributed.run", *where, *rank,
               f"--nproc-per-node={per}", "-m", "peer_dist.tools.bench_dist", "--worker", *argv]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    with _stop_on_signal(procs) as stopped:
        outs = [p.communicate() for p in procs]
    if stopped:
        print(f"peer-bench dist: stopped by {stopped[0]} while measuring {nprocs} rank(s); "
              "nothing is printed for an unfinished run: run it again to measure",
              file=sys.stderr)
        raise SystemExit(130)
    for p, (out, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            sys.stderr.write(out[-4000:] + err[-4000:])
            raise SystemExit(f"peer-bench dist: torchrun with {nprocs} ranks on {args.nodes} "
                             f"node(s) failed (exit {p.returncode})")
    return [json.loads(line) for line in outs[0][0].splitlines() if line.startswith("{")]


@contextlib.contextmanager
def _stop_on_signal(procs: list[subprocess.Popen]):
    """While the torchrun agents run: Ctrl-C or SIGTERM stops them (they stop their ranks) and
    is noted in the yielded list, instead of each rank's traceback reaching the user."""
    stopped: list[str] = []

    def stop(signum, _frame):
        stopped.append(signal.Signals(signum).name)
        for p in procs:
            if p.poll() is None:
                p.terminate()

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def paper_rows() -> list[dict]:
    """Model-only rows at the paper's layer: EP = 8 on one node, and 8 nodes x 8 GPUs."""
    from peer_dist.parallel import cost

    a = argparse.Namespace(**{k: PAPER[k] for k in ("num_experts", "dim", "heads", "topk")},
                           tokens=PAPER["tokens"])
    rows = []
    for world, nodes in ((PAPER["ep"], 1), (8 * PAPER["ep"], 8)):
        for strategy in ROWS:
            if strategy == "node_dispatch" and nodes == 1:
                continue
            ep = 1 if strategy == "replicated" else world
            mem = cost.table_bytes_per_rank(PAPER["num_experts"], PAPER["dim"], ep)
            rows.append(_row(strategy, world, world, a, None, None, mem, nodes=nodes,
                             source="model"))
    return rows


def _fmt(v, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v / scale:,.{digits}f}"


def _ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.3f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'source':8} {'strategy':13} {'W':>2} {'M':>2} {'EP':>2} {'C':>2} {'N':>8} {'d':>5} "
            f"{'T/rank':>6} {'step ms':>8} {'model ms':>8} {'comm ms':>8} {'KB/tok meas':>11} "
            f"{'KB/tok model':>12} {'meas/model':>10} {'inter meas':>10} {'inter model':>11} "
            f"{'inter m/m':>9} {'table MB/rank':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        m, p = r["bytes_per_token_layer"], r["bytes_per_token_layer_predicted"]
        im, ip = r["bytes_internode_per_token_layer"], r[
            "bytes_internode_per_token_layer_predicted"]
        print(f"{r['source']:8} {r['strategy']:13} {r['world_size']:>2} {r['nodes']:>2} "
              f"{r['ep']:>2} {r.get('overlap_chunks', 1):>2} {r['num_experts']:>8} "
              f"{r['dim']:>5} {r['tokens_per_rank']:>6} "
              f"{_fmt(r['step_s'], 1e-3):>8} {_fmt(r['step_s_predicted'], 1e-3):>8} "
              f"{_fmt(r.get('comm_exposed_s'), 1e-3):>8} "
              f"{_fmt(m, 1e3, 2):>11} {_fmt(p, 1e3, 2):>12} {_ratio(m, p):>10} "
              f"{_fmt(im, 1e3, 2):>10} {_fmt(ip, 1e3, 2):>11} {_ratio(im, ip):>9} "
              f"{_fmt(r['expert_mem_bytes_per_rank'], 1e6):>13}")
    print()
    for line in ratios(rows):
        print(line)


def ratios(rows: list[dict]) -> list[str]:
    """Per (source, world): replicated / dispatch bytes, node_dispatch / dispatch inter-node
    bytes, step against W = 1 and against the model; table memory relative to EP = 1."""
    out = []
    for (src, w, m) in sorted({(r["source"], r["world_size"], r["nodes"]) for r in rows}):
        by: dict[str, dict] = {}  # per strategy its row with the fewest chunks
        for r in sorted(rows, key=lambda r: r.get("overlap_chunks", 1)):
            if (r["source"], r["world_size"], r["nodes"]) == (src, w, m):
                by.setdefault(r["strategy"], r)
        sfx = "" if src == "measured" else "_predicted"
        if "dispatch" in by and "replicated" in by:
            d, rep = (by[k]["bytes_per_token_layer" + sfx] for k in ("dispatch", "replicated"))
            if d and rep:
                out.append(f"{src} W={w} M={m}: replicated / dispatch bytes = {rep / d:,.1f}x")
        if "dispatch" in by and "node_dispatch" in by:
            k = "bytes_internode_per_token_layer" + sfx
            d, nd = by["dispatch"][k], by["node_dispatch"][k]
            if d and nd:
                out.append(f"{src} W={w} M={m}: node_dispatch / dispatch inter-node bytes = "
                           f"{nd / d:.3f}")
    return out + step_ratios(rows) + overlap_ratios(rows) + _memory_ratios(rows)


def _key(r: dict) -> tuple:
    return (r["source"], r["strategy"], r["world_size"], r["nodes"], r["ep"],
            r.get("overlap_chunks", 1))


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """One row per (strategy, world, chunks): a single round's as it is; of several rounds,
    the round with the median step (its figures consistent with each other), with every
    round's step in step_s_rounds and, beside a W = 1 row of the same round, the ratios to it
    in step_ratio_w1_rounds."""
    if len(rounds) == 1:
        return rounds[0]
    runs: dict[tuple, list[dict]] = {}
    for got in rounds:
        one = {(r["strategy"], r.get("overlap_chunks", 1)): r["step_s"] for r in got
               if r["world_size"] == 1}
        for r in got:
            base = one.get((r["strategy"], r.get("overlap_chunks", 1)))
            ratio = r["step_s"] / base if base and r["world_size"] > 1 else None
            runs.setdefault(_key(r), []).append((r, ratio))
    out = []
    for same in runs.values():
        ordered = sorted(same, key=lambda pair: pair[0]["step_s"])
        row = dict(ordered[(len(ordered) - 1) // 2][0])
        row["step_s_rounds"] = [r["step_s"] for r, _ in same]
        ratios = [q for _, q in same if q is not None]
        if ratios:
            row["step_ratio_w1_rounds"] = ratios
        for key, name in (("solo_step_s", "step_ratio_solo_rounds"),
                          ("solo_all_step_s", "step_ratio_solo_all_rounds")):
            solo = [r["step_s"] / r[key] for r, _ in same if r.get(key)]
            if solo:
                row[name] = solo
        out.append(row)
    return out


def step_ratios(rows: list[dict]) -> list[str]:
    """Per measured row at W > 1: its step against its W = 1 row (same tokens per rank; of
    several rounds the median of each round's own ratio, and their range); against the
    one-rank steps run between the world's (--interleave: measured at the same moments), on
    rank 0 alone and on every rank at once (the latter leaves what sharing the machine costs
    out of the ratio: what remains is the exchange and its waits); the
    mix probe's seconds against W = 1's (the same work per rank with every rank running: what
    sharing the machine's cores, caches and memory costs, before any message); and, for every
    row, the step against the model's prediction."""
    meas = [r for r in rows if r["source"] == "measured"]
    one = {(r["strategy"], r["overlap_chunks"]): r for r in meas if r["world_size"] == 1}
    out = []
    for r in meas:
        base_row = one.get((r["strategy"], r["overlap_chunks"]))
        base = base_row["step_s"] if base_row else None
        c = f" C={r['overlap_chunks']}" if r["overlap_chunks"] > 1 else ""
        line = f"step {r['strategy']} W={r['world_size']} M={r['nodes']}{c}:"
        several = r.get("step_ratio_w1_rounds")
        if several:
            line += (f" / W=1 = {statistics.median(several):.3f}x (median of {len(several)} "
                     f"rounds, {min(several):.3f}-{max(several):.3f}),")
        elif base and r["world_size"] > 1:
            line += f" / W=1 = {r['step_s'] / base:.3f}x,"
        for key, rounds, what in (("solo_step_s", "step_ratio_solo_rounds", "interleaved"),
                                  ("solo_all_step_s", "step_ratio_solo_all_rounds",
                                   "on every rank at once")):
            if r.get(key):
                inter = r.get(rounds) or [r["step_s"] / r[key]]
                line += f" / W=1 {what} = {statistics.median(inter):.3f}x"
                line += (f" (median of {len(inter)} rounds, {min(inter):.3f}-"
                         f"{max(inter):.3f})," if len(inter) > 1 else ",")
        mix = (r.get("model_constants") or {}).get("mix_s_per_token")
        mix_one = ((base_row or {}).get("model_constants") or {}).get("mix_s_per_token")
        if mix and mix_one and r["world_size"] > 1:
            line += f" mix probe / W=1's = {mix / mix_one:.3f}x,"
        if r["step_s_predicted"]:
            line += f" measured / model = {r['step_s'] / r['step_s_predicted']:.3f}"
        out.append(line.rstrip(","))
    return out


def overlap_ratios(rows: list[dict]) -> list[str]:
    """Measured rows with C > 1 against the same strategy and world unchunked: the step and
    the exposed communication (comm_exposed_s) that overlap left."""
    meas = [r for r in rows if r["source"] == "measured"]
    plain = {(r["strategy"], r["world_size"], r["nodes"]): r for r in meas
             if r["overlap_chunks"] == 1}
    out = []
    for r in meas:
        base = plain.get((r["strategy"], r["world_size"], r["nodes"]))
        if r["overlap_chunks"] > 1 and base:
            out.append(f"overlap {r['strategy']} W={r['world_size']} M={r['nodes']} "
                       f"C={r['overlap_chunks']}: step / C=1 = "
                       f"{_ratio(r['step_s'], base['step_s'])}x, comm exposed / C=1 = "
                       f"{_ratio(r['comm_exposed_s'], base['comm_exposed_s'])}x")
    return out


def _memory_ratios(rows: list[dict]) -> list[str]:
    base = {r["strategy"]: r["expert_mem_bytes_per_rank"] for r in rows
            if r["source"] == "measured" and r["ep"] == 1}
    return [f"table memory {r['strategy']} EP={r['ep']} / EP=1 = "
            f"{r['expert_mem_bytes_per_rank'] / base[r['strategy']]:.1%}"
            for r in rows if r["source"] == "measured" and r["ep"] > 1
            and base.get(r["strategy"]) and r["strategy"] != "replicated"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        worker(args)
        return
    rows = []
    if "TORCHELASTIC_RUN_ID" in os.environ:  # already under torchrun: this world only
        print("peer-bench dist: running under torchrun is invalid: it launches torchrun "
              "itself; allowed is a plain run (or --worker for one world size)", file=sys.stderr)
        raise SystemExit(2)
    passthrough = [a for a in argv if a != "--json"]
    rounds: list[list[dict]] = []
    for i in range(args.rounds):
        rounds.append([])
        for n in args.sizes:
            of = f" (round {i + 1} of {args.rounds})" if args.rounds > 1 else ""
            print(f"peer-bench dist: {n} rank(s) on {args.nodes} node(s){of}...",
                  file=sys.stderr, flush=True)
            rounds[-1] += launch(args, passthrough, n)
    rows += median_rows(rounds)
    if not args.no_paper:
        rows += paper_rows()
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
