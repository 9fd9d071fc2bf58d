"""node_dispatch (and auto, which may pick it) against the single-process model, with the ranks
split into nodes by LOCAL_WORLD_SIZE: 2 to 4 ranks as 2 to 4 "nodes", uneven tokens (a rank
with none), uneven blocks (1024 rows over 3 owners), EP x DP, fp64, and the Triton kernels
under the interpreter. The same checks as test_parity.py (its helpers), plus the bytes by link:
every message of every strategy listed from the ids with Python sets (independently of the
plans) and summed per rank and link, against the counters at the collectives and the cost
model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import test_parity as tp
import torch
import torch.distributed as dist
from spawn import run_ranks

from peer_dist.ops import cpu as fused_cpu
from peer_dist.ops import triton_mix
from peer_dist.parallel import comm_stats, cost, expert_shards, reset_comm_stats
from peer_dist.parallel.node_dispatch import Routes
from peer_dist.train.sparse_optim import RowSparseOptimizer

check = tp.check


def check_layer(ep: int, balance: bool) -> None:
    for strategy in ("node_dispatch", "auto"):
        ref, sharded, topo = tp._pair(strategy, ep, balance)
        with check(f"{strategy}/init_rows"):
            tp._check_tables(ref, sharded, grads=False)
        tp._check_step(ref, sharded, topo, step=0, tag=strategy)


def check_optimizer(ep: int, balance: bool) -> None:
    """Three steps of the row-sparse optimizer (and SGD on the router) on both models."""
    for kind in ("lazy_adam", "dense_adam"):
        ref, sharded, topo = tp._pair("node_dispatch", ep, balance)
        opts = [RowSparseOptimizer([ref.experts.u, ref.experts.v], kind, lr=1e-2),
                RowSparseOptimizer(expert_shards(sharded)[0].params(), kind, lr=1e-2),
                torch.optim.SGD(ref.router.parameters(), lr=0.1),
                torch.optim.SGD(sharded.router.parameters(), lr=0.1)]
        for step in range(3):
            for m in (ref, sharded):
                m.zero_grad(set_to_none=True)
            for p in expert_shards(sharded)[0].params():
                p.grad = None
            tp._forward_backward(ref, sharded, topo, step)
            for p in sharded.router.parameters():
                p.grad = tp._avg_grad(p, topo.world_size)
            for opt in opts:
                opt.step()
        with check(f"node_dispatch+{kind}/table_rows_after_3_steps"):
            tp._check_tables(ref, sharded, grads=False)
        with check(f"node_dispatch+{kind}/router_after_3_steps"):
            for a, b in zip(sharded.router.parameters(), ref.router.parameters(), strict=True):
                torch.testing.assert_close(a, b, **tp.TOL)


def _messages(strategy: str, ids: list[torch.Tensor], shard, r: Routes, elem: int):
    """Every message of one step: (source, destination, bytes, direction), from the ids of each
    EP member (ids[j] (T_j, S)) with sets, from the strategy's definition."""
    w, de, m = len(ids), shard.dim * elem, shard.idmap
    meta = 8 + 4 * -(-elem // 4)
    b = -(-m.n // w)
    owner = lambda e: ((e * m.a + m.c) % m.n) // b  # noqa: E731
    count_row = {"fetch": 8, "dispatch": 16, "node_dispatch": 8 * (2 * w + r.num_nodes)}
    out = [(s, j, count_row[strategy], "fwd") for s in range(w) for j in range(w)]
    for s, x in enumerate(ids):
        if strategy == "fetch":
            for e in {e for e in x.reshape(-1).tolist()}:
                o = owner(e)
                out += [(s, o, 4, "fwd"), (o, s, 2 * de, "fwd"), (s, o, 2 * de, "bwd")]
            continue
        # the member that relays s's tokens to each owner (dispatch: s itself)
        gw = [r.gateway[s][r.node[o]] if strategy == "node_dispatch" else s for o in range(w)]
        for row in x.tolist():
            owners = [owner(e) for e in row]
            for g in {gw[o] for o in owners}:  # hop 1 (node_dispatch): one x per node
                out += [(s, g, de, "fwd"), (g, s, de, "fwd"), (s, g, de, "bwd"),
                        (g, s, de, "bwd")]
                out += [(s, g, meta, "fwd"), (g, s, elem, "bwd")] * sum(
                    gw[o] == g for o in owners)
            for o in set(owners):  # from the gateway (dispatch: the source) to the owner
                g = gw[o]
                out += [(g, o, de, "fwd"), (o, g, de, "fwd"), (g, o, de, "bwd"),
                        (o, g, de, "bwd")]
                out += [(g, o, meta, "fwd"), (o, g, elem, "bwd")] * owners.count(o)
    return out


def _tally(msgs, me: int, r: Routes) -> tuple[int, ...]:
    """(sent fwd, sent bwd, received fwd, received bwd, sent to other nodes) of member me."""
    t = [0] * 5
    for s, d, n, direction in msgs:
        if s == d:
            continue  # a local copy
        if s == me:
            t[0 if direction == "fwd" else 1] += n
            t[4] += n * (r.node[d] != r.node[me])
        if d == me:
            t[2 if direction == "fwd" else 3] += n
    return tuple(t)


def check_bytes_by_link(ep: int, balance: bool) -> None:
    for strategy in ("fetch", "dispatch", "node_dispatch"):
        ref, sharded, topo = tp._pair(strategy, ep, balance)
        x, _ = tp._batch(0)
        ref.record_routing = True
        ref(x)
        ids_all = ref.last_routing[0].split(tp._split(topo.world_size))
        group = list(ids_all[topo.dp_rank * topo.ep:(topo.dp_rank + 1) * topo.ep])
        reset_comm_stats(sharded)
        tp._forward_backward(ref, sharded, topo, step=0)
        st = next(iter(comm_stats(sharded).values()))
        shard = expert_shards(sharded)[0]
        r = sharded.experts.strategies["node_dispatch"].routes
        elem = torch.empty(0, dtype=tp.Setting.dtype).element_size()
        got = (st["bytes_sent_fwd"], st["bytes_sent_bwd"], st["bytes_recv_fwd"],
               st["bytes_recv_bwd"], st["bytes_sent_internode"])
        with check(f"{strategy}/bytes_by_link"):
            want = _tally(_messages(strategy, group, shard, r, elem), topo.ep_rank, r)
            assert got == want, f"{strategy}: counted {got}, expected {want}"
        measured = torch.tensor([st["bytes_sent_intranode"], st["bytes_sent_internode"]],
                                dtype=torch.float64)
        dist.all_reduce(measured, group=topo.ep_group)
        model = [cost.by_link(strategy, cost.source_counts(ids, shard.idmap, r), j, r,
                              shard.dim, elem) for j, ids in enumerate(group)]
        with check(f"{strategy}/cost_model_by_link"):
            want = [sum(x[i] for x in model) for i in (0, 1)]
            assert measured.tolist() == want, (strategy, measured.tolist(), want)


def _worker(rank: int, world: int, ranks_per_node: int, ep: int, balance: bool,
            extras: tuple[str, ...], setting: dict, out: str) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(ranks_per_node)  # what torchrun sets on each node
    torch.set_num_threads(1)
    tp.Setting.dtype, tp.Setting.split = setting["dtype"], setting["split"]
    tp.Setting.kernels = setting.get("kernels")
    launches = []
    if setting.get("kernels") == "triton":
        triton_mix.use_triton(True)
        fused_cpu.use_fused_cpu(False)
        real = triton_mix.forward
        triton_mix.forward = lambda *a, **k: launches.append(1) or real(*a, **k)
    tp.TOL.clear()
    tp.TOL.update(setting["tol"])
    tp.Results.failed, tp.Results.ran = {}, []
    check_layer(ep, balance)
    if "triton" in extras:
        with check("triton/kernels_ran"):
            assert len(launches) > 0, "the Triton kernels never ran"
    else:
        check_optimizer(ep, balance)
        check_bytes_by_link(ep, balance)
    reports: list = [None] * world
    dist.all_gather_object(reports, (tp.Results.ran, tp.Results.failed))
    if rank == 0:
        failed = {}
        for r, (_, fails) in enumerate(reports):
            for name, msg in fails.items():
                failed.setdefault(name, f"rank {r}: {msg}")
        Path(out).write_text(json.dumps({"ran": tp.Results.ran, "failed": failed}))


UNEVEN = dict(tp.FP32, split=[3, 9, 0, 12])  # 24 tokens, one rank with none
LAYOUTS = {  # id: (world, ranks per node, ep, balance, extras, setting)
    "w2-2nodes": (2, 1, 0, False, (), tp.FP32),
    "w3-3nodes-uneven-fp64": (3, 1, 0, True, (), tp.UNEVEN_FP64),  # 342, 342, 340 rows
    "w4-2nodes-uneven": (4, 2, 0, True, (), UNEVEN),
    "ep2xdp2-4nodes": (4, 1, 2, True, (), tp.FP32),  # each EP group spans 2 nodes
    "ep4xdp1-1node": (4, 4, 0, False, (), tp.FP32),  # one node: node_dispatch = dispatch
    # 2 nodes x 2 ranks on the Triton kernels (one layout: the kernels are the same at any
    # layout): tokens relayed by a gateway to another owner
    "w4-2nodes-triton": (4, 2, 0, True, ("triton",), dict(tp.TRITON, split=[7, 0, 12, 5])),
}
LAYER = [f"{s}/{p}" for s in ("node_dispatch", "auto")
         for p in ("init_rows", "outputs", "input_grad", "router_grads", "table_grads")]
OPTIM = [f"node_dispatch+{k}/{p}" for k in ("lazy_adam", "dense_adam")
         for p in ("table_rows_after_3_steps", "router_after_3_steps")]
BYTES = [f"{s}/{p}" for s in ("fetch", "dispatch", "node_dispatch")
         for p in ("bytes_by_link", "cost_model_by_link")]
CASES = [(layout, prop) for layout, spec in LAYOUTS.items()
         for prop in LAYER + (["triton/kernels_ran"] if "triton" in spec[4] else OPTIM + BYTES)]
_RESULTS: dict[str, dict] = {}


def layout_results(layout: str, tmp_dir: Path) -> dict:
    if layout not in _RESULTS:
        out = tmp_dir / f"node-{layout}.json"
        run_ranks(_worker, LAYOUTS[layout][0], *LAYOUTS[layout][1:], str(out))
        _RESULTS[layout] = json.loads(out.read_text())
    return _RESULTS[layout]


@pytest.mark.parametrize("layout, prop", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_node_dispatch(layout: str, prop: str, tmp_path_factory) -> None:
    results = layout_results(layout, tmp_path_factory.getbasetemp())
    assert prop in results["ran"], f"{prop} was not checked"
    assert prop not in results["failed"], results["failed"][prop]


def test_gateways_are_rail_aligned_and_local_tokens_go_direct() -> None:
    r = Routes((5, 5, 7, 7, 7), block=10)  # two nodes of 2 and 3 members
    assert r.node == [0, 0, 1, 1, 1] and r.index == [0, 1, 0, 1, 2]
    assert [r.gateway[s][r.node[s]] for s in range(5)] == list(range(5))  # own node: itself
    assert r.gateway[1] == [1, 3] and r.gateway[4] == [0, 4]  # index 2 wraps on a node of 2
    assert r.first_row(1) == 20


def test_comm_stats_split_bytes_by_link_per_token() -> None:
    from peer_dist.parallel import CommStats

    st = CommStats()
    st.note_call("node_dispatch", tokens=4)
    st.add("fwd", sent=100, recv=90, seconds=0.0, internode=30)
    st.add("bwd", sent=20, recv=10, seconds=0.0, internode=10)
    d = st.as_dict()
    assert (d["bytes_sent"], d["bytes_sent_internode"], d["bytes_sent_intranode"]) == (120, 40, 80)
    assert (d["bytes_internode_per_token"], d["bytes_intranode_per_token"]) == (10.0, 20.0)
