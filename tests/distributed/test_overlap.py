"""fetch, dispatch and node_dispatch with parallel.overlap_chunks > 1 (transfers of one chunk
under the compute of another) against whole tables in one process, fp64: outputs, input and
gate gradients, table gradients, at 2 to 4 ranks with uneven tokens (a rank with none, chunks
with none, more chunks than tokens or rows; node_dispatch over 2 nodes of 2 ranks, where
gateways relay, and over 3 nodes of one); outputs and gradients against the same strategy
without chunks; and its bytes: the unchunked ones plus one count row per extra chunk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from spawn import run_ranks

from peer_dist.model.peer import ExpertTables, init_rows
from peer_dist.ops import peer_mix
from peer_dist.parallel import ShardedExperts, Topology
from peer_dist.parallel.dispatch import chunk_bounds
from peer_dist.parallel.grad_sync import sync_layer_grads
from peer_dist.tools.cluster_model import collectives

N, DIM, S = 300, 8, 6
TOL = dict(atol=1e-10, rtol=1e-10)
SIZES = [5, 0, 7, 3]  # tokens per rank (a world of W ranks: the first W)


def _everyone(world: int, g: torch.Generator):
    sizes = SIZES[:world]
    xs = [torch.randn(t, DIM, generator=g, dtype=torch.float64) for t in sizes]
    ids = [torch.randint(0, N, (t, S), generator=g) for t in sizes]
    gates = [torch.rand(t, S, generator=g, dtype=torch.float64) for t in sizes]
    return xs, ids, gates


def _reference(tables: ExpertTables, xs, ids, gates, g: torch.Generator):
    su, sv = tables.table_seeds()
    u, v = (init_rows(s, 0, N, DIM, tables.std).double().requires_grad_(True) for s in (su, sv))
    x, gt = torch.cat(xs).requires_grad_(True), torch.cat(gates).requires_grad_(True)
    y = peer_mix(x, torch.cat(ids), gt, u, v, "gelu", sparse_grad=False)
    c = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * c).sum().backward()
    return y.detach(), x.grad, gt.grad, u.grad, v.grad, c


RANKS_PER_NODE = {2: 1, 3: 1, 4: 2}  # node_dispatch's layouts: "nodes" by LOCAL_WORLD_SIZE


def _run(rank: int, world: int, strategy: str, chunks: int, dtype: torch.dtype, ep: int):
    if strategy == "node_dispatch":  # what torchrun sets on each node
        os.environ["LOCAL_WORLD_SIZE"] = str(RANKS_PER_NODE[world])
    tables = ExpertTables(N, DIM, "gelu", seed=1)
    g = torch.Generator().manual_seed(5)
    xs, ids, gates = _everyone(world, g)
    ref = _reference(tables, xs, ids, gates, g)
    layer = ShardedExperts("t", tables, Topology.build(ep), strategy, balance_ids=True,
                           overlap_chunks=chunks)
    for t in layer.shard.params():
        t.data = t.data.to(dtype)
    x, gt = (t[rank].to(dtype).requires_grad_(True) for t in (xs, gates))
    y = layer(x, ids[rank], gt)
    a = sum(SIZES[:rank])
    b = a + SIZES[rank]
    (y * ref[5][a:b].to(dtype)).sum().backward()
    if layer.topo.dp > 1:  # EP x DP: the replicas' row gradients summed
        sync_layer_grads(layer)
    for t in layer.shard.params():  # the mix's 1/W (each rank's loss a mean) undone: sums here
        t.grad = t.grad * float(world)
    return layer, (y, x.grad, gt.grad), ref, (a, b)


def _kernels(kernels: str) -> tuple[torch.dtype, dict, list]:
    """The dtype and tolerance of a case; "triton": the Triton kernels (interpreter on CPU)
    in fp32, their forward launches counted in the returned list."""
    if kernels != "triton":
        return torch.float64, TOL, []
    from peer_dist.ops import cpu as fused_cpu
    from peer_dist.ops import triton_mix

    triton_mix.use_triton(True)
    fused_cpu.use_fused_cpu(False)
    launches: list = []
    real = triton_mix.forward
    triton_mix.forward = lambda *a, **k: launches.append(1) or real(*a, **k)
    return torch.float32, dict(atol=2e-5, rtol=1e-4), launches


def _worker(rank: int, world: int, strategy: str, chunks: int, kernels: str, ep: int,
            out: str) -> None:
    torch.set_num_threads(1)
    fails: dict[str, str] = {}
    dtype, tol, launches = _kernels(kernels)

    def check(name, fn):
        try:
            fn()
        except AssertionError as e:
            fails[name] = str(e).splitlines()[0][:300]

    def close(a, b):
        torch.testing.assert_close(a, b.to(a.dtype), **tol)

    layer, mine, ref, (a, b) = _run(rank, world, strategy, chunks, dtype, ep)
    e = layer.shard.expert_ids()
    check("outputs", lambda: close(mine[0], ref[0][a:b]))
    check("input_grad", lambda: close(mine[1], ref[1][a:b]))
    check("gate_grad", lambda: close(mine[2], ref[2][a:b]))
    check("table_grads", lambda: [close(p.grad.to_dense(), full[e])
                                  for p, full in zip(layer.shard.params(), ref[3:5],
                                                     strict=True)])
    if kernels == "triton":
        check("kernels_ran", lambda: _assert(launches or not SIZES[rank],  # mixes its tokens
                                             "the Triton kernels never ran"))
    chunked = layer.stats.as_dict()
    plain, theirs, _, _ = _run(rank, world, strategy, 1, dtype, ep)
    grads = lambda lay: [p.grad.to_dense() for p in lay.shard.params()]  # noqa: E731
    check("unchunked", lambda: torch.testing.assert_close(
        [*mine, *grads(layer)], [*theirs, *grads(plain)], **tol))

    def counted():
        # one count column per extra chunk: dispatch (pairs, selections), fetch (rows),
        # node_dispatch (pairs and selections per owner, pairs per node: 2W + M)
        w = layer.topo.ep
        cols = {"dispatch": 2, "fetch": 1, "node_dispatch": 2 * w + len(
            layer.strategies["node_dispatch"].routes.members)}[strategy]
        extra = (chunks - 1) * (w - 1) * cols * 8
        assert chunked["bytes_sent"] == plain.stats.as_dict()["bytes_sent"] + extra
        # the all-to-alls made, as the step-time model counts them (a latency each)
        made = (chunked["collectives"], plain.stats.as_dict()["collectives"])
        assert made == (collectives(strategy, chunks), collectives(strategy, 1)), made
        assert chunked["strategy"] == strategy and "overlapped" in chunked["stage_seconds"]
        assert "comm_wait" in chunked["stage_seconds"]

    check("bytes_and_stages", counted)
    import torch.distributed as dist

    reports: list = [None] * world
    dist.all_gather_object(reports, fails)
    if rank == 0:
        merged = {k: f"rank {r}: {v}" for r, f in enumerate(reports) for k, v in f.items()}
        Path(out).write_text(json.dumps(merged))


def _assert(ok, msg: str) -> None:
    assert ok, msg


# (strategy, world, chunks, kernels, ep): 8 chunks leave some empty; 64 is more than any
# rank's tokens and than the rows it asks of any owner; "triton": fp32 on the Triton kernels;
# ep 2 of world 4: EP x DP = 2 x 2 (0: EP = W)
CASES = [("dispatch", 2, 2, "cpu", 0), ("dispatch", 3, 3, "cpu", 0), ("dispatch", 3, 8, "cpu", 0),
         ("fetch", 2, 2, "cpu", 0), ("fetch", 3, 3, "cpu", 0), ("fetch", 3, 64, "cpu", 0),
         ("fetch", 2, 3, "triton", 0), ("fetch", 4, 3, "cpu", 2),
         ("node_dispatch", 4, 3, "cpu", 0), ("node_dispatch", 3, 8, "cpu", 0),
         ("node_dispatch", 4, 2, "cpu", 2)]
PROPS = ["outputs", "input_grad", "gate_grad", "table_grads", "unchunked", "bytes_and_stages"]
PARAMS = [(*c, p) for c in CASES for p in PROPS + (["kernels_ran"] if c[3] == "triton" else [])]
_DONE: dict = {}


@pytest.mark.parametrize("strategy, world, chunks, kernels, ep, prop", PARAMS,
                         ids=[f"{s}-w{w}-c{c}-{k}-ep{e}-{p}" for s, w, c, k, e, p in PARAMS])
def test_overlapped_matches_whole_tables(strategy: str, world: int, chunks: int, kernels: str,
                                         ep: int, prop: str, tmp_path_factory) -> None:
    case = (strategy, world, chunks, kernels, ep)
    if case not in _DONE:
        out = tmp_path_factory.getbasetemp() / f"overlap-{'-'.join(map(str, case))}.json"
        run_ranks(_worker, world, strategy, chunks, kernels, ep, str(out))
        _DONE[case] = json.loads(out.read_text())
    assert prop not in _DONE[case], _DONE[case][prop]


def test_chunks_cover_the_tokens_in_order() -> None:
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert chunk_bounds(0, 2) == [(0, 0), (0, 0)]


def test_row_chunks_cut_each_owners_block() -> None:
    from peer_dist.parallel.fetch import _row_chunks

    owner = torch.tensor([0, 0, 0, 0, 0, 2, 2])  # owner 0: 5 rows, owner 1: none, owner 2: 2
    chunk, slot, counts = _row_chunks(owner, 3, 2)
    assert chunk.tolist() == [0, 0, 0, 1, 1, 0, 1]  # ceil(5/2) = 3 rows, then 2; 1 and 1
    assert counts.tolist() == [[3, 2], [0, 0], [1, 1]]
    assert slot.tolist() == [0, 1, 2, 0, 1, 3, 2]  # chunk buffers are owner-major
    chunk, slot, counts = _row_chunks(owner, 3, 8)  # more chunks than rows: one row each
    assert chunk.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert counts.sum().item() == 7 and slot.tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_every_strategy_overlaps() -> None:
    from peer_dist.config import OVERLAPPING, STRATEGIES, load_config
    from peer_dist.parallel.store import Dispatch, Fetch, NodeDispatch

    assert {s.name for s in (Fetch, Dispatch, NodeDispatch) if s.overlaps} == set(OVERLAPPING)
    assert set(OVERLAPPING) == set(STRATEGIES) - {"auto"}
    for strategy in STRATEGIES:
        cfg = load_config(None, [f"parallel.strategy={strategy}", "parallel.overlap_chunks=4"])
        assert cfg.parallel.overlap_chunks == 4


def test_chunks_row_gradients_sum_into_one_coalesced_tensor() -> None:
    """The chunks' table gradients (rows overlapping between chunks) summed into one tensor
    with each row once, ascending, marked coalesced (nothing left for the sync to sort), equal
    to the dense sum; a part whose rows are out of order is coalesced first; a result still
    held keeps its (pooled) buffer while the next one is made."""
    from peer_dist.parallel.dispatch import sum_chunk_grads

    def part(rows, seed, dim=4, n=50):
        vals = torch.randn(len(rows), dim, generator=torch.Generator().manual_seed(seed))
        return torch.sparse_coo_tensor(torch.tensor([rows]), vals, (n, dim))

    a, b, c = part([1, 7, 20], 0), part([0, 7, 21, 49], 1), part([21, 3], 2)  # c: unsorted
    got = sum_chunk_grads([a, b, c])
    assert got.is_coalesced() and got._indices()[0].tolist() == [0, 1, 3, 7, 20, 21, 49]
    torch.testing.assert_close(got.to_dense(), a.to_dense() + b.to_dense() + c.to_dense())
    assert sum_chunk_grads([a]) is a and sum_chunk_grads([]) is None
    assert torch.equal(sum_chunk_grads([a.to_dense(), b.to_dense()]), a.to_dense() + b.to_dense())
    # 2,048 rows of 256 floats a part: 2 MB, above the buffer pool's threshold
    g = torch.Generator().manual_seed(3)
    big = [part(torch.randperm(5000, generator=g)[:2048].sort().values.tolist(), s, 256, 5000)
           for s in range(4)]
    first = sum_chunk_grads(big[:2])
    kept = first._values().clone()
    second = sum_chunk_grads(big[2:])
    assert torch.equal(first._values(), kept)
    assert first._values().data_ptr() != second._values().data_ptr()
