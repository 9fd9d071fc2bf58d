"""Each strategy's three stages alone (input_dist, compute, output_dist), at 2 and 3 ranks with
uneven token counts (one rank with none at 3), against what the stage must hold by definition:
the tokens, rows and gates an owner must receive, the partials its rows give, and the layer's
output from whole tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawn import run_once, run_ranks

from peer_dist.model.peer import ExpertTables
from peer_dist.ops import peer_mix
from peer_dist.parallel import ShardedExperts, Topology

N, DIM, S = 300, 8, 6  # 300 rows over 3 owners with balancing: uneven blocks
TOL = dict(atol=1e-10, rtol=1e-10)


def _inputs(rank: int, world: int):
    tokens = [7, 4, 0][rank] if world == 3 else [7, 4][rank]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, DIM, generator=g, dtype=torch.float64)
    ids = torch.randint(0, N, (tokens, S), generator=g)
    if tokens:
        ids[0, 1] = ids[0, 0]  # a repeated expert within a token
    gates = torch.rand(tokens, S, generator=g, dtype=torch.float64)
    return x, ids, gates


def _everyone(rank: int, world: int) -> list[tuple]:
    return [_inputs(r, world) for r in range(world)]


def _check(name: str, fails: dict, fn) -> None:
    try:
        fn()
    except AssertionError as e:
        fails[name] = str(e).splitlines()[0][:300]


def _dispatch_checks(layer: ShardedExperts, tables: ExpertTables, me: int, world: int,
                     fails: dict) -> None:
    st, shard, m = layer.strategies["dispatch"], layer.shard, layer.idmap
    x, ids, gates = _inputs(me, world)
    got = st.input_dist(x, ids, gates)
    want_x, want_rows, want_gates, want_bag = [], [], [], []
    for xr, idr, gr in _everyone(me, world):  # by source rank, then token, then selection
        owner, local = m.split(m.position(idr))
        for t in range(xr.shape[0]):
            mine = (owner[t] == me).nonzero().squeeze(1)
            if mine.numel():
                want_bag += [len(want_x)] * mine.numel()
                want_x.append(xr[t])
                want_rows.append(local[t, mine])
                want_gates.append(gr[t, mine])
    cat = lambda ts, like: torch.cat(ts) if ts else like.new_zeros(0)  # noqa: E731

    def received():
        assert got.x.shape[0] == len(want_x)
        if want_x:
            torch.testing.assert_close(got.x, torch.stack(want_x), **TOL)
        assert got.rows.tolist() == cat(want_rows, ids).tolist()
        assert got.bag.tolist() == want_bag
        torch.testing.assert_close(got.gates, cat(want_gates, x), **TOL)

    _check("dispatch/input_dist", fails, received)
    y_in = st.compute(got, shard.u, shard.v)

    def partials():
        u, v = shard.u.detach(), shard.v.detach()
        w = got.gates * F.gelu((u[got.rows] * got.x[got.bag]).sum(-1))
        want = got.x.new_zeros(got.x.shape).index_add(0, got.bag, w[:, None] * v[got.rows])
        torch.testing.assert_close(y_in, want, **TOL)

    _check("dispatch/compute", fails, partials)
    y = st.output_dist(got, y_in, x.shape[0])
    _check("dispatch/output_dist", fails, lambda: torch.testing.assert_close(
        y, peer_mix(x, ids, gates, tables.u, tables.v), **TOL))


def _fetch_checks(layer: ShardedExperts, tables: ExpertTables, me: int, world: int,
                  fails: dict) -> None:
    st, shard, m = layer.strategies["fetch"], layer.shard, layer.idmap
    x, ids, gates = _inputs(me, world)
    req = st.input_dist(x, ids, gates)
    want = []
    for _, idr, _ in _everyone(me, world):
        owner, local = m.split(m.position(torch.unique(idr)))
        want += sorted(local[owner == me].tolist())
    _check("fetch/input_dist", fails, lambda: (
        None if req.plan.served.tolist() == want else pytest.fail("served rows differ")))
    served = st.compute(req, shard.u, shard.v)
    tables_served = [t.detach()[req.plan.served] for t in shard.params()]
    _check("fetch/compute", fails, lambda: [torch.testing.assert_close(a, b, **TOL)
                                            for a, b in zip(served, tables_served, strict=True)])
    y = st.output_dist(req, served, x.shape[0])
    _check("fetch/output_dist", fails, lambda: torch.testing.assert_close(
        y, peer_mix(x, ids, gates, tables.u, tables.v), **TOL))


PAUSE = 0.05  # seconds the compute stage is made to last (a sleep), to see where it is counted


def _timed_checks(layer: ShardedExperts, rank: int, world: int, fails: dict) -> None:
    """stage_seconds against the layer's whole forward, timed around it: each stage counted,
    their sum within the forward, and a compute stage slowed by PAUSE counted as compute."""
    x, ids, gates = _inputs(rank, world)
    st = layer.strategies["dispatch"]
    compute = st.compute

    def slow(*args):
        time.sleep(PAUSE)
        return compute(*args)

    st.compute = slow
    layer.stats.reset()
    dist.barrier()
    t0 = time.perf_counter()
    layer(x, ids, gates)
    whole = time.perf_counter() - t0
    st.compute = compute
    seconds = dict(layer.stats.stage_seconds)

    def timed():
        assert set(seconds) == {"input_dist", "compute", "output_dist"}, seconds
        assert all(s > 0 for s in seconds.values()), seconds
        assert seconds["compute"] >= PAUSE, seconds
        # the stages are the forward: nothing else in it takes more than a small part
        assert 0.5 * whole <= sum(seconds.values()) <= whole, (seconds, whole)

    _check("stage_seconds", fails, timed)


def _worker(rank: int, world: int, balance: bool, out: str) -> None:
    torch.set_num_threads(1)
    tables = ExpertTables(N, DIM, "gelu", seed=5, device="cpu").double()
    topo = Topology.build(world)
    layer = ShardedExperts("stages", tables, topo, "dispatch", balance_ids=balance)
    fails: dict[str, str] = {}
    with torch.no_grad():
        _dispatch_checks(layer, tables, rank, world, fails)
        _fetch_checks(layer, tables, rank, world, fails)
    _timed_checks(layer, rank, world, fails)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, fails)
    if rank == 0:
        merged = {k: f"rank {r}: {v}" for r, f in enumerate(everyone) for k, v in f.items()}
        Path(out).write_text(json.dumps(merged))


STAGES = [f"{s}/{p}" for s in ("dispatch", "fetch")
          for p in ("input_dist", "compute", "output_dist")] + ["stage_seconds"]
_RESULTS: dict[str, dict] = {}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", STAGES)
def test_stage(world: int, stage: str, tmp_path_factory) -> None:
    out = tmp_path_factory.getbasetemp() / f"stages{world}.json"
    results = run_once(_RESULTS, f"stages{world}", lambda: (
        run_ranks(_worker, world, world == 3, str(out)), json.loads(out.read_text()))[1])
    assert stage not in results, results[stage]
