"""Sharded PEER (gloo ranks) against the single-process model on the global batch.

One spawn per layout (world, ep) runs every check: both strategies (and auto), outputs,
gradients of the input, of the routing parameters and of the table rows, rows after optimizer
steps (dense and lazy Adam), BN running statistics, byte counters against an independent count,
zero-size splits, and (for EP x DP = 2 x 2) a whole transformer. Each check is recorded under
its own name and reported by its own test (`test_parity[w3-balanced-dispatch/outputs]`), so a
failure names what broke.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from spawn import run_once, run_ranks

from peer_dist.config import ModelConfig, ParallelConfig, PEERConfig
from peer_dist.model.peer import PEER
from peer_dist.model.transformer import build_model, lm_loss
from peer_dist.ops import cpu as fused_cpu
from peer_dist.ops import peer_mix, triton_mix
from peer_dist.parallel import (
    Topology,
    comm_stats,
    cost,
    expert_shards,
    parallelize,
    reset_comm_stats,
    shard_dtensors,
    sync_expert_grads,
)
from peer_dist.train.sparse_optim import RowSparseOptimizer


class Results:
    """Failures by check name on this rank (an AssertionError is recorded, the run goes on)."""

    failed: dict[str, str] = {}
    ran: list[str] = []

    @classmethod
    @contextmanager
    def check(cls, name: str):
        cls.ran.append(name)
        try:
            yield
        except AssertionError as e:
            cls.failed[name] = str(e).splitlines()[0][:500] if str(e) else "assertion failed"


check = Results.check
DIM, T_GLOBAL = 16, 24  # 24 tokens split evenly over 1, 2, 3 and 4 ranks, or unevenly
PEER_CFG = PEERConfig(num_experts=1024, heads=2, topk=4, d_key=8)  # 1024 / 3 is not integral
FP32 = dict(dtype=torch.float32, split=None, tol=dict(atol=2e-5, rtol=1e-4))


class Setting:
    """This process's layout: dtype, tokens per rank (None: T_GLOBAL / world each), tolerance,
    the sharded model's kernels (None: the default path)."""

    dtype, split, tol = FP32["dtype"], FP32["split"], FP32["tol"]
    kernels: str | None = None


TOL = Setting.tol  # the same dict object, updated in place per layout


def _pair(strategy: str, ep: int, balance: bool, seed: int = 3) -> tuple[PEER, PEER, Topology]:
    torch.manual_seed(0)
    ref = PEER(DIM, PEER_CFG, seed=seed, table_device="cpu").to(Setting.dtype)
    torch.manual_seed(0)
    sharded = PEER(DIM, PEER_CFG, seed=seed).to(Setting.dtype)  # meta tables: never built
    topo = Topology.build(ep)
    parallelize(sharded, topo, ParallelConfig(ep=ep, strategy=strategy, balance_ids=balance))
    return ref, sharded, topo


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return tuple(torch.randn(T_GLOBAL, DIM, generator=g, dtype=Setting.dtype) for _ in "xc")


def _split(world: int) -> list[int]:
    return Setting.split or [T_GLOBAL // world] * world


def _mine(t: torch.Tensor, topo: Topology) -> torch.Tensor:
    sizes = _split(topo.world_size)
    start = sum(sizes[:topo.rank])
    return t[start:start + sizes[topo.rank]]


def _avg_grad(p: torch.Tensor, world: int) -> torch.Tensor:
    g = p.grad.clone()
    dist.all_reduce(g)
    return g / world


@contextmanager
def _reference_kernels():
    """The single-process reference on the C kernels where the sharded model runs Triton's:
    under the interpreter the whole global batch's reference, on every rank, was most of a
    Triton layout's time; the C kernels are themselves checked against PyTorch."""
    if Setting.kernels != "triton":
        yield
        return
    triton_mix.use_triton(False)
    fused_cpu.use_fused_cpu(True)
    try:
        yield
    finally:
        triton_mix.use_triton(True)
        fused_cpu.use_fused_cpu(False)


def _forward_backward(ref: PEER, sharded: PEER, topo: Topology, step: int):
    """Global-batch mean loss on ref; on the sharded twin this rank's share of it, scaled by
    the world size (its mean over its tokens when every rank has as many)."""
    x, c = _batch(step)
    xr = x.clone().requires_grad_(True)
    with _reference_kernels():
        yr = ref(xr)
        (yr * c).sum(-1).mean().backward()
    xs = _mine(x, topo).clone().requires_grad_(True)
    ys = sharded(xs)
    ((ys * _mine(c, topo)).sum() * (topo.world_size / T_GLOBAL)).backward()
    sync_expert_grads(sharded)
    return yr, xr, ys, xs


def _check_tables(ref: PEER, sharded: PEER, grads: bool) -> None:
    shard = expert_shards(sharded)[0]
    e = shard.expert_ids()
    for mine, full in ((shard.u, ref.experts.u), (shard.v, ref.experts.v)):
        torch.testing.assert_close(mine.detach(), full.detach()[e], **TOL)
        if grads:
            torch.testing.assert_close(mine.grad.to_dense(), full.grad.to_dense()[e], **TOL)
            touched = set(mine.grad.coalesce().indices()[0].tolist())
            ref_rows = set(full.grad.coalesce().indices()[0].tolist())
            assert touched == {i for i, x in enumerate(e.tolist()) if x in ref_rows}


def _check_step(ref: PEER, sharded: PEER, topo: Topology, step: int, tag: str) -> None:
    yr, xr, ys, xs = _forward_backward(ref, sharded, topo, step)
    with check(f"{tag}/outputs"):
        torch.testing.assert_close(ys, _mine(yr.detach(), topo), **TOL)
    with check(f"{tag}/input_grad"):
        # rank r's loss is W x its share of the global mean: so is its input gradient
        torch.testing.assert_close(xs.grad, _mine(xr.grad, topo) * topo.world_size, **TOL)
    pairs = zip(sharded.router.named_parameters(), ref.router.parameters(), strict=True)
    grads = [(_avg_grad(p, topo.world_size), q.grad, name) for (name, p), q in pairs]
    with check(f"{tag}/router_grads"):
        for mine, want, name in grads:
            torch.testing.assert_close(mine, want, **TOL, msg=name)
    with check(f"{tag}/table_grads"):
        _check_tables(ref, sharded, grads=True)


def check_layer_parity(topo_ep: int, balance: bool,
                       strategies: tuple[str, ...] = ("fetch", "dispatch", "auto")) -> None:
    for strategy in strategies:
        ref, sharded, topo = _pair(strategy, topo_ep, balance)
        with check(f"{strategy}/init_rows"):  # exactly the single-process rows
            _check_tables(ref, sharded, grads=False)
        with check(f"{strategy}/dtensor_view"):
            _check_dtensors(ref, sharded, topo)
        _check_step(ref, sharded, topo, step=0, tag=strategy)


def _check_dtensors(ref: PEER, sharded: PEER, topo: Topology) -> None:
    """The checkpoint view: DTensor Shard(0) over the mesh gathers to the (permuted) table."""
    shard = expert_shards(sharded)[0]
    pos = torch.arange(shard.num_experts)
    for name, dt in shard_dtensors(shard, topo).items():
        full = getattr(ref.experts, name).detach()[shard.idmap.expert(pos)]
        torch.testing.assert_close(dt.full_tensor(), full)


def check_optimizer_parity(topo_ep: int, balance: bool) -> None:
    for strategy, kind in (("fetch", "dense_adam"), ("dispatch", "lazy_adam"),
                           ("dispatch", "dense_adam"), ("fetch", "lazy_adam")):
        ref, sharded, topo = _pair(strategy, topo_ep, balance)
        opt_ref = RowSparseOptimizer([ref.experts.u, ref.experts.v], kind, lr=1e-2)
        opt_sh = RowSparseOptimizer(expert_shards(sharded)[0].params(), kind, lr=1e-2)
        dense_ref = torch.optim.SGD(ref.router.parameters(), lr=0.1)
        dense_sh = torch.optim.SGD(sharded.router.parameters(), lr=0.1)
        for step in range(3):
            for m in (ref, sharded):
                m.zero_grad(set_to_none=True)
            for p in expert_shards(sharded)[0].params():
                p.grad = None
            _forward_backward(ref, sharded, topo, step)
            for p in sharded.router.parameters():
                p.grad = _avg_grad(p, topo.world_size)  # what DeepSpeed does for dense params
            for opt in (opt_ref, opt_sh, dense_ref, dense_sh):
                opt.step()
        tag = f"{strategy}+{kind}"
        with check(f"{tag}/table_rows_after_3_steps"):
            _check_tables(ref, sharded, grads=False)
        with check(f"{tag}/router_after_3_steps"):
            for a, b in zip(sharded.router.parameters(), ref.router.parameters(), strict=True):
                torch.testing.assert_close(a, b, **TOL)
        with check(f"{tag}/bn_running_stats"):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(sharded.router.norm, name),
                                           getattr(ref.router.norm, name), **TOL, msg=name)


def _expected_bytes(ids: list[torch.Tensor], shard, me: int, strategy: str) -> tuple[int, ...]:
    """(sent_fwd, sent_bwd, recv_fwd, recv_bwd) of group member `me`, counted from the ids
    with Python sets (independently of the plans): ids[j] are member j's (T, S) selections."""
    idmap, ep, d = shard.idmap, len(ids), shard.dim
    elem = torch.empty(0, dtype=Setting.dtype).element_size()
    meta = 8 + 4 * -(-elem // 4)  # (local row, pair) int32 and the gate, in whole words
    b = -(-idmap.n // ep)

    def owner(e: int) -> int:
        return ((e * idmap.a + idmap.c) % idmap.n) // b

    if strategy == "fetch":
        wanted = [{e for e in t.reshape(-1).tolist()} for t in ids]  # distinct rows per member
        out = sum(1 for e in wanted[me] if owner(e) != me)
        inn = sum(1 for j in range(ep) if j != me for e in wanted[j] if owner(e) == me)
        counts = 8 * (ep - 1)
        return (counts + 4 * out + 2 * d * elem * inn, 2 * d * elem * out,
                counts + 4 * inn + 2 * d * elem * out, 2 * d * elem * inn)
    pairs = [{(t, owner(e)) for t, row in enumerate(x.tolist()) for e in row} for x in ids]
    sels = [[owner(e) for e in x.reshape(-1).tolist()] for x in ids]
    p_out = sum(1 for _, o in pairs[me] if o != me)
    p_in = sum(1 for j in range(ep) if j != me for _, o in pairs[j] if o == me)
    q_out = sum(1 for o in sels[me] if o != me)
    q_in = sum(1 for j in range(ep) if j != me for o in sels[j] if o == me)
    counts, de = 16 * (ep - 1), d * elem
    return (counts + de * p_out + meta * q_out + de * p_in,
            de * p_out + de * p_in + elem * q_in,
            counts + de * p_in + meta * q_in + de * p_out,
            de * p_in + de * p_out + elem * q_out)


def check_byte_counters(topo_ep: int, balance: bool) -> None:
    for strategy in ("fetch", "dispatch"):
        ref, sharded, topo = _pair(strategy, topo_ep, balance)
        x, _ = _batch(0)
        ref.record_routing = True
        ref(x)
        ids_all = ref.last_routing[0].split(_split(topo.world_size))
        group = ids_all[topo.dp_rank * topo.ep:(topo.dp_rank + 1) * topo.ep]
        reset_comm_stats(sharded)
        _forward_backward(ref, sharded, topo, step=0)
        st = next(iter(comm_stats(sharded).values()))
        got = (st["bytes_sent_fwd"], st["bytes_sent_bwd"], st["bytes_recv_fwd"],
               st["bytes_recv_bwd"])
        shard = expert_shards(sharded)[0]
        with check(f"{strategy}/byte_counters"):
            want = _expected_bytes(list(group), shard, topo.ep_rank, strategy)
            assert got == want, f"{strategy}: counted {got}, expected {want}"
        total = _cost_model_total(st, group, shard, topo, strategy)
        with check(f"{strategy}/cost_model_bytes"):
            assert abs(total[0] - total[1]) < 1e-6, (strategy, *total)


def _cost_model_total(st: dict, group: torch.Tensor, shard, topo: Topology,
                      strategy: str) -> tuple[float, float]:
    """(bytes sent over the EP group, the cost model's per-rank formula summed over it)."""
    total = torch.tensor([float(st["bytes_sent"])], dtype=torch.float64)
    dist.all_reduce(total, group=topo.ep_group)
    predicted, elem = 0.0, torch.empty(0, dtype=Setting.dtype).element_size()
    for j, ids in enumerate(group):
        if strategy == "fetch":
            predicted += cost.fetch_bytes(cost.fetch_rows_out(ids, shard.idmap, j), topo.ep,
                                          shard.dim, elem)
        else:
            pairs, sels = cost.dispatch_counts_out(ids, shard.idmap, j)
            predicted += cost.dispatch_bytes(pairs, sels, topo.ep, shard.dim, elem)
    return float(total), predicted


def check_zero_size_splits(topo_ep: int) -> None:
    """Rank 0 selects only its own rows; rank 1 selects only rows of owner 0: many zero splits."""
    for strategy in ("fetch", "dispatch"):
        ref, sharded, topo = _pair(strategy, topo_ep, balance=False)
        b = -(-PEER_CFG.num_experts // topo.ep)
        g = torch.Generator().manual_seed(7)
        t, s = 3, 4
        ids = torch.randint(0, PEER_CFG.num_experts, (topo.world_size, t, s), generator=g)
        ids[0] = torch.randint(0, b, (t, s), generator=g)
        ids[1] = torch.randint(0, b, (t, s), generator=g)
        if topo.world_size > 2:
            ids[2, 1:] = torch.randint(b, 2 * b, (t - 1, s), generator=g)
        gates = torch.rand(topo.world_size, t, s, generator=g)
        x = torch.randn(topo.world_size, t, DIM, generator=g)
        u = ref.experts.u.detach().clone().requires_grad_(True)
        y_ref = peer_mix(x.view(-1, DIM), ids.view(-1, s), gates.view(-1, s), u,
                         ref.experts.v.detach(), "gelu", sparse_grad=False)
        y_ref.sum().backward()
        xs = x[topo.rank].clone().requires_grad_(True)
        y = sharded.experts(xs, ids[topo.rank], gates[topo.rank])
        y.sum().backward()
        with check(f"{strategy}/zero_splits_outputs"):
            torch.testing.assert_close(
                y, y_ref.view(topo.world_size, t, DIM)[topo.rank].detach(), **TOL)
        sync_expert_grads(sharded)
        shard = expert_shards(sharded)[0]
        with check(f"{strategy}/zero_splits_table_grads"):
            # sum-of-losses here, so undo the 1/W mean scaling before comparing
            torch.testing.assert_close(shard.u.grad.to_dense() * topo.world_size,
                                       u.grad[shard.expert_ids()], **TOL)


def check_transformer(topo_ep: int) -> None:
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16,
                      peer_blocks="all", peer=PEERConfig(num_experts=256, heads=2, topk=4,
                                                         d_key=8))
    ref = build_model(cfg, seed=11)
    model = build_model(cfg, seed=11, materialize=False)
    topo = Topology.build(topo_ep)
    parallelize(model, topo, ParallelConfig(ep=topo_ep, strategy="auto", balance_ids=True))
    tokens = torch.randint(0, 64, (topo.world_size * 2, 9), generator=torch.Generator()
                           .manual_seed(3))
    ref_loss = lm_loss(ref(tokens[:, :-1]), tokens[:, 1:])
    ref_loss.backward()
    mine = tokens[topo.rank * 2:(topo.rank + 1) * 2]
    loss = lm_loss(model(mine[:, :-1]), mine[:, 1:])
    loss.backward()
    sync_expert_grads(model)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    with check("transformer/loss"):
        torch.testing.assert_close(mean_loss / topo.world_size, ref_loss.detach(), **TOL)
    ref_params = dict(ref.named_parameters())
    grads = [(name, _avg_grad(p, topo.world_size)) for name, p in model.named_parameters()]
    with check("transformer/dense_grads"):
        for name, g in grads:
            torch.testing.assert_close(g, ref_params[name].grad, **TOL, msg=name)
    with check("transformer/shards_are_not_parameters"):
        assert not any(p is s.u or p is s.v for p in model.parameters()
                       for s in expert_shards(model))
    with check("transformer/table_grads"):
        for layer, shard in zip(ref.peer_layers(), expert_shards(model), strict=True):
            e = shard.expert_ids()
            torch.testing.assert_close(shard.v.grad.to_dense(),
                                       layer.experts.v.grad.to_dense()[e], **TOL)


def _worker(rank: int, world: int, ep: int, balance: bool, extras: tuple[str, ...],
            setting: dict, out: str) -> None:
    torch.set_num_threads(1)
    Setting.dtype, Setting.split = setting["dtype"], setting["split"]
    Setting.kernels = setting.get("kernels")
    launches = []
    if setting.get("kernels") == "triton":  # the sharded model on the Triton kernels
        triton_mix.use_triton(True)
        fused_cpu.use_fused_cpu(False)
        real = triton_mix.forward
        triton_mix.forward = lambda *a, **k: launches.append(1) or real(*a, **k)
    TOL.clear()
    TOL.update(setting["tol"])
    Results.failed, Results.ran = {}, []
    if "triton" in extras:  # only what the kernels compute: the interpreter is slow, and
        # bytes, the optimizers and the auto choice do not depend on the kernels
        check_layer_parity(ep, balance, TRITON_STRATEGIES)
    else:
        check_layer_parity(ep, balance)
        check_optimizer_parity(ep, balance)
        check_byte_counters(ep, balance)
    if "zero_splits" in extras:
        check_zero_size_splits(ep)
    if "transformer" in extras:
        check_transformer(ep)
    if "triton" in extras:
        with check("triton/kernels_ran"):
            assert len(launches) > 0, "the Triton kernels never ran"
    reports: list = [None] * world
    dist.all_gather_object(reports, (Results.ran, Results.failed))
    if rank == 0:
        failed = {}
        for r, (_, fails) in enumerate(reports):
            for name, msg in fails.items():
                failed.setdefault(name, f"rank {r}: {msg}")
        Path(out).write_text(json.dumps({"ran": Results.ran, "failed": failed}))


# fp64, 0 / 9 / 15 tokens per rank: rank 0 takes part in every collective with no tokens
UNEVEN_FP64 = dict(dtype=torch.float64, split=[0, 9, 15], tol=dict(atol=1e-12, rtol=1e-10))
# the Triton kernels at the owners (dispatch) and the requesters (fetch); 7 / 17 tokens
TRITON = dict(FP32, split=[7, 17], kernels="triton")
LAYOUTS = {  # id: (world, ep, balance, extras, setting)
    "w1": (1, 0, False, (), FP32),
    "w2": (2, 0, False, (), FP32),
    "w3-balanced": (3, 0, True, (), FP32),  # 1024 rows over 3 owners: 342, 342, 340
    "w3-uneven-fp64": (3, 0, True, (), UNEVEN_FP64),
    "w2-triton": (2, 0, True, ("triton",), TRITON),
    "w4": (4, 0, False, ("zero_splits",), FP32),
    "ep2xdp2": (4, 2, True, ("transformer",), FP32),  # EP x DP = 2 x 2
}
LAYER = [f"{s}/{p}" for s in ("fetch", "dispatch", "auto")
         for p in ("init_rows", "dtensor_view", "outputs", "input_grad", "router_grads",
                   "table_grads")]
OPTIM = [f"{s}/{p}" for s in ("fetch+dense_adam", "dispatch+lazy_adam", "dispatch+dense_adam",
                              "fetch+lazy_adam")
         for p in ("table_rows_after_3_steps", "router_after_3_steps", "bn_running_stats")]
BYTES = [f"{s}/{p}" for s in ("fetch", "dispatch") for p in ("byte_counters", "cost_model_bytes")]
EXTRAS = {"zero_splits": [f"{s}/zero_splits_{p}" for s in ("fetch", "dispatch")
                          for p in ("outputs", "table_grads")],
          "triton": ["triton/kernels_ran"],
          "transformer": [f"transformer/{p}" for p in ("loss", "dense_grads",
                                                       "shards_are_not_parameters",
                                                       "table_grads")]}
TRITON_STRATEGIES = ("fetch", "dispatch")  # the kernels at the requesters, at the owners
TRITON_LAYER = [p for p in LAYER if p.split("/")[0] in TRITON_STRATEGIES]
CASES = [(layout, prop) for layout, (_, _, _, extras, _) in LAYOUTS.items()
         for prop in (TRITON_LAYER if "triton" in extras else LAYER + OPTIM + BYTES)
         + [p for e in extras for p in EXTRAS[e]]]
_RESULTS: dict[str, dict] = {}


def layout_results(layout: str, tmp_dir: Path) -> dict:
    """One spawn per layout runs every check; later cases read the recorded results (or the
    spawn's failure)."""
    out = tmp_dir / f"{layout}.json"

    def run() -> dict:
        run_ranks(_worker, LAYOUTS[layout][0], *LAYOUTS[layout][1:], str(out))
        return json.loads(out.read_text())

    return run_once(_RESULTS, layout, run)


@pytest.mark.parametrize("layout, prop", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_parity(layout: str, prop: str, tmp_path_factory) -> None:
    results = layout_results(layout, tmp_path_factory.getbasetemp())
    assert prop in results["ran"], f"{prop} was not checked"
    assert prop not in results["failed"], results["failed"][prop]
