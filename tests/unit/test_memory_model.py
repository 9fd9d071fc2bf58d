"""The memory model's arithmetic on hand-checked cases, and peer-scale predict / plan."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from peer_dist.config import ModelConfig, PEERConfig
from peer_dist.model.transformer import build_model
from peer_dist.tools import memory_model as mm
from peer_dist.tools.scale import main

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

GIB = 1024 ** 3


def setup(n: int = 1024 ** 2, d: int = 1024, **kw) -> mm.Setup:
    peer = PEERConfig(num_experts=n, heads=kw.pop("heads", 8), topk=kw.pop("topk", 16))
    model = ModelConfig(dim=d, n_layers=4, n_heads=4, peer=peer,
                        peer_blocks=kw.pop("peer_blocks", "middle"))
    return mm.Setup(model, **kw).validate()


def test_paper_scale_table_bytes_match_design_numbers():
    # N = 1024^2, d = 1024, one layer, fp32: 2 * N * d * 4 B = 8 GiB of tables, Adam 2x that.
    s = setup(ep=1)
    assert mm.expert_param_bytes(s) == 2 * 1024 ** 2 * 1024 * 4 == 8 * GIB
    assert mm.table_state_bytes(s) == 16 * GIB
    s8 = setup(ep=8, world_size=8, dtype="bf16")  # bf16 training keeps fp32 shards
    assert mm.expert_param_bytes(s8) == 2 * 131072 * 1024 * 4  # 1 GiB per rank
    s8 = setup(ep=8, world_size=8, dtype="bf16", table_dtype="bf16")
    assert mm.expert_param_bytes(s8) == 2 * 131072 * 1024 * 2  # 512 MiB per rank in bf16
    assert mm.table_state_bytes(s8) == 2 * GIB  # fp32 moments whatever the table dtype


def test_uneven_shard_uses_ceil_rows_and_optimizer_kinds():
    # N = 9 rows over EP = 2: torch.chunk gives 5 + 4 rows; the largest shard decides.
    kw = dict(n=9, d=8, heads=1, topk=2, ep=2, world_size=2)
    assert mm.rows_per_rank(9, 2) == 5 and mm.rows_per_rank(9, 4) == 3
    assert mm.expert_param_bytes(setup(**kw)) == 5 * 8 * 2 * 4  # rows * d * 2 tables * fp32
    assert mm.table_state_bytes(setup(table_optimizer="lazy_adam", **kw)) == 2 * 5 * 8 * 4 * 2
    assert mm.table_state_bytes(setup(table_optimizer="dense_adam", **kw)) == 640
    assert mm.table_state_bytes(setup(table_optimizer="adagrad", **kw)) == 5 * 4 * 2
    assert mm.table_state_bytes(setup(table_optimizer="sgd", **kw)) == 0
    four = setup(peer_blocks="all", **kw)  # four PEER layers
    assert mm.expert_param_bytes(four) == 4 * 320


def test_bf16_table_state_halves_optimizer_bytes():
    # N = 9 over EP = 2 -> 5 rows, d = 8, bf16 state: 2 B per value.
    kw = dict(n=9, d=8, heads=1, topk=2, ep=2, world_size=2, table_state_dtype="bf16")
    # lazy_adam: 2 moments * 5 rows * 8 * 2 B * 2 tables = 320 (fp32: 640)
    assert mm.table_state_bytes(setup(table_optimizer="lazy_adam", **kw)) == 320
    # adagrad: 5 rows * 2 B * 2 tables = 20 (fp32: 40)
    assert mm.table_state_bytes(setup(table_optimizer="adagrad", **kw)) == 20
    # paper scale, one layer: 2 tables * 2 moments * 1024^2 * 1024 * 2 B = 8 GiB (fp32: 16)
    big = setup(ep=1, table_state_dtype="bf16")
    assert mm.table_state_bytes(big) == 8 * GIB
    assert mm.breakdown(big)["expert_tables"] == 8 * GIB + 8 * GIB  # fp32 params + bf16 state
    with pytest.raises(ValueError, match="table_state_dtype='fp16'"):
        setup(table_state_dtype="fp16")


def test_expected_unique_hand_values():
    assert mm.expected_unique(2, 1) == pytest.approx(1.0)
    assert mm.expected_unique(2, 2) == pytest.approx(1.5)  # 2 * (1 - 1/4)
    assert mm.expected_unique(10 ** 6, 10) == pytest.approx(10.0, rel=1e-4)
    assert mm.expected_unique(100, 10 ** 6) == pytest.approx(100.0)
    assert mm.expected_unique(0, 5) == 0.0


def test_sparse_grads_bounded_by_touched_rows():
    # 1024 tokens x 128 selections on 1M rows: 1M * (1 - exp(-1/8)) ~ 123,200 rows touched.
    s = setup(ep=1, tokens_per_rank=1024)
    touched = 1024 ** 2 * -math.expm1(131072 * math.log1p(-2 ** -20))
    assert mm.touched_rows(s) == pytest.approx(touched)
    assert mm.expert_grad_bytes(s) == int(touched * (1024 * 4 + 8)) * 2
    # A batch far larger than the table touches every local row, never more.
    big = setup(n=4096, d=8, ep=2, world_size=2, tokens_per_rank=10 ** 6)
    assert mm.touched_rows(big) == 2048


def test_zero_stage_bytes_per_param():
    assert mm.dense_bytes_per_param("bf16", 0, 4) == 16.0  # 2 + 2 + 12
    assert mm.dense_bytes_per_param("bf16", 1, 4) == 7.0  # 2 + 2 + 12/4
    assert mm.dense_bytes_per_param("bf16", 2, 4) == 5.5  # 2 + (2 + 12)/4
    assert mm.dense_bytes_per_param("bf16", 3, 4) == 4.0  # 16/4
    assert mm.dense_bytes_per_param("fp32", 0, 2) == 16.0  # 4 + 4 + 8 (no master copy)
    assert mm.dense_bytes_per_param("fp32", 1, 2) == 14.0  # 4 + 4 + (4 + 8)/2
    assert mm.dense_bytes_per_param("fp32", 3, 2) == 10.0  # (4 + 4 + 12)/2


@pytest.mark.parametrize("model", [
    ModelConfig(),
    ModelConfig(dim=64, n_layers=3, peer_blocks="all", vocab_size=100,
                peer=PEERConfig(num_experts=1024, heads=2, topk=4, d_key=16, shared_keys=True,
                                query_batchnorm=False)),
])
def test_dense_param_count_matches_built_model(model):
    built = build_model(model, seed=0, materialize=False)
    count = sum(p.numel() for name, p in built.named_parameters()
                if not name.endswith(("experts.u", "experts.v")))
    assert mm.dense_param_count(model) == count


def test_all_to_all_buffers_and_bytes_moved():
    assert mm.a2a_bytes(setup(ep=1)) == 0 and mm.a2a_bytes_moved(setup(ep=1)) == 0
    # dispatch, S = 1 selection, EP = 2, 100 tokens: each token has one owner, remote with
    # probability 1/2 -> P = Q = 50. Sent per step (cost.py): counts 2*8*(E-1) = 16,
    # x and dy out 2 * P * d * 4 = 3200, the partial y and dx back the same 3200 (P_in = P_out),
    # 16 B of metadata and dgate per remote selection = 800: 7216 B.
    s = setup(n=16, d=8, heads=1, topk=1, ep=2, world_size=2, strategy="dispatch",
              tokens_per_rank=100)
    assert mm.a2a_bytes_moved(s) == 16 + 3200 + 3200 + 800
    # at the peak, what the layer keeps for backward: P*d*4 of x + Q * (12 B meta + 2*4)
    assert mm.a2a_bytes(s) == 50 * 8 * 4 + 50 * 20
    # fetch with every one of the 16 rows selected: 8 remote rows, int32 ids, 4*d*4 B per row
    fetch = setup(n=16, d=8, heads=1, topk=1, ep=2, world_size=2, strategy="fetch",
                  tokens_per_rank=10 ** 4)
    assert mm.a2a_bytes_moved(fetch) == 8 + int(8 * (4 + 4 * 8 * 4))
    assert mm.a2a_bytes(fetch) == 16 * 2 * 8 * 4  # kept: all 16 rows of U and V


def test_breakdown_total_and_validation():
    b = mm.breakdown(setup(ep=2, world_size=4))
    assert b["total"] == sum(b[k] for k in mm.COMPONENTS)
    assert b["expert_tables"] == b["expert_params"] + b["expert_optim"]
    with pytest.raises(ValueError, match="ep=3 is invalid"):
        setup(ep=3, world_size=4)
    with pytest.raises(ValueError, match="table_optimizer='adam'"):
        setup(table_optimizer="adam")


def test_predict_cli_writes_table_csv_plot(tmp_path, capsys):
    main(["predict", "--num-experts", "4096,16384", "--dim", "64", "--ep", "1,2",
          "--out", str(tmp_path), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and {r["ep"] for r in rows} == {1, 2}
    r = next(r for r in rows if r["num_experts"] == 16384 and r["ep"] == 2)
    assert r["expert_params"] == 8192 * 64 * 2 * 4  # one middle PEER layer, fp32
    assert r["expert_bytes_per_rank_predicted"] == 3 * r["expert_params"]  # lazy_adam
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    with open(tmp_path / "table.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| num_experts |" in (tmp_path / "table.md").read_text()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_plan_lists_fitting_settings_best_first(capsys):
    # 1M experts x d=1024 x 1 layer in bf16 with lazy_adam needs 4 + 16 GiB of tables and
    # fp32 moments at EP = 1:
    # it cannot fit 16 GiB GPUs at EP 1, so the best setting uses EP > 1.
    main(["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "16",
          "--num-experts", "1048576", "--dim", "1024", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["fits"] for r in rows)
    assert all(r["peak_bytes_per_rank_predicted"] <= 16 * GIB * 0.95 for r in rows)
    # by hand, the leading setting (EP 2: 524288 rows of fp32 U and V per rank, lazy Adam's two
    # fp32 moments per value): 4 GiB of tables and 8 GiB of moments, and the headroom is what
    # the rest of the peak leaves of the 16 GiB
    best = rows[0]
    assert best["ep"] == 2 and best["table_dtype"] == "fp32"
    assert best["expert_params"] == 524288 * 1024 * 2 * 4 == 4 * GIB
    assert best["expert_optim"] == 2 * 4 * GIB
    rest = sum(best[k] for k in ("expert_grads", "dense", "activations", "a2a", "grad_sync",
                                 "runtime"))
    assert best["headroom_bytes"] == 16 * GIB - 12 * GIB - rest
    assert {r["micro_batch"] for r in rows} <= {1, 2, 4, 8, 16, 32}
    assert rows[0]["table_optimizer"] == "lazy_adam" and rows[0]["ep"] > 1
    assert not any(r["ep"] == 1 and r["table_optimizer"] == "lazy_adam" for r in rows)
    assert rows[0]["ep"] == min(r["ep"] for r in rows if r["table_optimizer"] == "lazy_adam")
    # same EP: ZeRO 1/2 (no extra traffic) before 3, least memory first -> stage 2 leads
    assert rows[0]["zero_stage"] == 2


def test_cli_table_state_dtype_halves_adam_state(tmp_path, capsys):
    """`--table-state-dtype bf16` reaches the model: N=65536, d=256, EP=2 holds 32768 rows per
    rank; lazy Adam keeps 2 moments x 2 tables x 32768 x 256 values: 128 MiB fp32, 64 MiB bf16."""
    import json

    from peer_dist.tools import scale

    optim = {}
    for dt in ("fp32", "bf16"):
        scale.main(["predict", "--num-experts", "65536", "--dim", "256", "--ep", "2",
                    "--table-state-dtype", dt, "--out", str(tmp_path / dt), "--json"])
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row["table_state_dtype"] == dt
        optim[dt] = row["expert_optim"]
    assert optim == {"fp32": 128 * 2**20, "bf16": 64 * 2**20}


@pytest.mark.parametrize("over", [
    ["model.dim=64", "model.peer_blocks=1"], ["model.dim=128", "model.peer_blocks=none"],
    ["model.dim=96", "model.n_layers=3", "model.peer_blocks=all", "model.peer.heads=4"],
    ["model.dim=64", "model.ffw_mult=8", "model.vocab_size=512", "model.peer_blocks=0"]])
def test_saved_activations_match_what_autograd_keeps(over):
    """The activation term's saved part against the bytes autograd's saved-tensor hooks see
    in one forward of the real model (parameters excluded, each storage once)."""
    import torch

    from peer_dist.config import load_config
    from peer_dist.model.transformer import build_model, lm_loss

    cfg = load_config(str(TINY), over + ["model.peer.num_experts=4096"])
    model = build_model(cfg.model, 0)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.train.seq_len + 1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    s = mm.Setup(cfg.model, tokens_per_rank=4 * cfg.train.seq_len)
    predicted, measured = mm.saved_activation_bytes(s), sum(seen.values())
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)


def test_zero_buckets_on_gpu_and_cpu():
    """ZeRO 1-2 hold one reduction bucket of max(P, 2^20) elements (stage 3 two); a GPU holds
    all of it, CPU RSS only the part gradients pass through."""
    small = setup(n=4096, d=64, zero_stage=0, device="cuda")
    p = mm.dense_param_count(small.model)
    assert p < (1 << 20) and mm.bucket_bytes(small) == 0
    for stage, bufs in ((1, 1), (2, 1), (3, 2)):
        gpu = setup(n=4096, d=64, zero_stage=stage, device="cuda", world_size=2)
        cpu = setup(n=4096, d=64, zero_stage=stage, device="cpu", world_size=2)
        assert mm.bucket_bytes(gpu) == bufs * (1 << 20) * 4
        assert mm.bucket_bytes(cpu) == bufs * p * 4
    assert mm.bucket_elements(10 ** 10) == 5 * 10 ** 8
    with pytest.raises(ValueError, match="device='tpu'"):
        setup(device="tpu")


def test_touched_rows_match_counts_of_uniform_ids():
    """The table-gradient term's expected distinct rows against counted ones (uniform ids)."""
    import torch

    g = torch.Generator().manual_seed(0)
    for n, tokens, world in ((4096, 256, 1), (65536, 1024, 2), (1024, 64, 4)):
        s = setup(n=n, d=64, heads=2, topk=4, tokens_per_rank=tokens, world_size=world)
        counted = [torch.unique(torch.randint(0, n, (tokens * world * 8,), generator=g)).numel()
                   for _ in range(5)]
        assert abs(mm.touched_rows(s) / (sum(counted) / 5) - 1) < 0.02


def test_fit_calibration_recovers_known_constants():
    """Synthetic peaks made from known constants (two runtime groups, a per-token scratch and
    one per selection for local and dispatch): the fit finds them back and its residuals are
    zero; a point off by 1 MB moves the fit, and the residual shows it."""
    runtime = {"a": 300 << 20, "b": 410 << 20}
    truth = {"local": 100, "dispatch": 250, "fetch": 0, "token": 3000}
    pts = [(1, 1, 128, 8, 16, "a"), (1, 1, 4096, 8, 16, "a"), (1, 1, 4096, 4, 8, "a"),
           (2, 2, 128, 8, 16, "b"), (2, 2, 4096, 8, 16, "b"), (2, 2, 2048, 4, 8, "b")]
    setups, groups = [], []
    for ep, world, tokens, heads, topk, g in pts:
        setups.append(setup(n=4096, d=64, heads=heads, topk=topk, ep=ep, world_size=world,
                            tokens_per_rank=tokens, scratch=truth))
        groups.append(g)
    measured = [mm.breakdown(s)["total"] - mm.breakdown(s)["runtime"] + runtime[g]
                for s, g in zip(setups, groups, strict=True)]
    fit = mm.fit_calibration(setups, measured, groups)
    assert fit.runtime == runtime
    assert fit.scratch == {"local": 100, "dispatch": 250, "token": 3000}
    assert max(map(abs, fit.residuals)) < 1e-9
    # the fit's own terms: the point's prediction with the fitted constants is the peak
    s = setups[1]
    s.scratch, s.runtime_bytes = {**truth, **fit.scratch}, fit.runtime["a"]
    assert mm.breakdown(s)["total"] == measured[1]
    off = mm.fit_calibration(setups, [m + (1 << 20) * (i == 1) for i, m in enumerate(measured)],
                             groups)
    assert off.scratch != fit.scratch and max(map(abs, off.residuals)) > 1e-4


def test_selection_scratch_per_token_and_selection():
    # 128 selections: token + 128 * per-selection bytes, by kind (EP 1: local)
    table = {"local": 10, "fetch": 20, "dispatch": 30, "token": 500}
    assert mm.selection_scratch(setup(ep=1, scratch=table)) == 500 + 128 * 10
    assert mm.selection_scratch(setup(ep=2, world_size=2, strategy="fetch",
                                      scratch=table)) == 500 + 128 * 20
    assert mm.selection_scratch(setup(ep=2, world_size=2, scratch=table)) == 500 + 128 * 30
    assert mm.selection_scratch(setup(peer_blocks="none", scratch=table)) == 0


def test_calibration_and_validation_grids_are_disjoint_and_varied():
    """The validation grid shares no point with the calibration grid nor with an earlier
    validation grid, has at least 24 points, and varies what the issue asks: N, d, tokens,
    selections, EP, ZeRO stage, table dtype, strategy."""
    from peer_dist.tools import scale

    cal, val = set(scale.CALIBRATION_GRID), scale.VALIDATION_GRID
    assert len(val) >= 24 and len(set(val)) == len(val) and not cal & set(val)
    for past in scale.PAST_VALIDATION_GRIDS:
        assert not set(past) & set(val) and not set(past) & cal
    assert len({p.n for p in val}) >= 3 and not {p.n for p in val} & {p.n for p in cal}
    assert len({p.d for p in val}) >= 3 and not {p.d for p in val} & {p.d for p in cal}
    assert len({p.tokens for p in val}) >= 3 and len({p.heads * p.topk for p in val}) >= 3
    assert {p.ep for p in val} == {1, 2} and {p.zero for p in val} == {0, 1, 2, 3}
    assert {p.table_dtype for p in val} == {"fp32", "bf16"}
    assert {p.strategy for p in val if p.ep > 1} == {"fetch", "dispatch"}
    # every runtime group the validation uses is calibrated
    assert {(p.world, p.zero) for p in val} <= {(p.world, p.zero) for p in cal}


class _LiveBytes:
    """Counts the bytes of live CPU tensors that torch ops create (by storage) and keeps the
    peak: an independent count of what a piece of code holds at once."""

    def __init__(self):
        self.live, self.now, self.peak = {}, 0, 0

    def _drop(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[ptr]

    def track(self, t) -> None:
        import weakref

        import torch

        if not isinstance(t, torch.Tensor) or t.is_sparse or t.untyped_storage().nbytes() == 0:
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.live:
            self.live[ptr][0] += 1
        else:
            self.live[ptr] = [1, t.untyped_storage().nbytes()]
            self.now += self.live[ptr][1]
            self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._drop, ptr)

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    counter.track(t)
                return out

        return Mode()


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_query_bn_backward_bytes_match_a_count(one_rank_group):
    """sync_bn_bytes against the live tensors the global-statistics BatchNorm's backward
    holds at once: the incoming gradient, dxhat and float64 copies, T x C each."""
    import torch

    from peer_dist.parallel.batchnorm import SyncBatchNorm1d

    t, heads, d_key = 512, 4, 64
    bn = SyncBatchNorm1d(torch.nn.BatchNorm1d(heads * d_key))
    x = torch.randn(t, heads * d_key, requires_grad=True)
    y = bn(x)
    dy = torch.randn_like(y)
    count = _LiveBytes()
    with count.mode():  # in training dy is a fresh (T, C) tensor too, made by the backward
        y.backward(dy.clone())  # of what the router does with the query after the BN
    s = setup(n=4096, d=64, heads=heads, topk=4, ep=1, world_size=2, tokens_per_rank=t)
    s.model.peer.d_key = d_key
    # peak: dy, dxhat and three float64 (T, C) at once (dx comes after they are freed)
    assert abs(mm.sync_bn_bytes(s) / count.peak - 1) < 0.05, (mm.sync_bn_bytes(s), count.peak)
    assert mm.sync_bn_bytes(setup(n=4096, d=64, heads=heads, topk=4, tokens_per_rank=t)) == 0
    assert mm.sync_bn_bytes(mm.Setup(s.model, ep=1, world_size=2, tokens_per_rank=t,
                                     bn_sync="local")) == 0


@pytest.mark.parametrize("rows", [50, 100_000])  # every row touched: dense path; sparse path
def test_reduce_rows_bytes_match_a_count(one_rank_group, rows):
    """reduce_rows_held against the live tensors grad_sync.reduce_rows creates for a gradient
    of n1 rows (one replica: the paths' buffers are those of DP replicas with dp = 1)."""
    import torch

    from peer_dist.parallel.grad_sync import reduce_rows

    d, n1 = 32, 50
    idx = torch.randperm(rows)[:n1].sort().values
    g = torch.sparse_coo_tensor(idx[None], torch.randn(n1, d), (rows, d),
                                check_invariants=True).coalesce()
    count = _LiveBytes()
    held_before = (g.indices(), g.values())  # the input: alive before the call
    for t in held_before:
        count.track(t)
    input_ = count.now
    with count.mode():
        out = reduce_rows(g, one_rank_group, 1)
    assert torch.equal(out.to_dense(), g.to_dense())
    assert input_ == n1 * (d * 4 + 8)
    held = mm.reduce_rows_held(rows, n1, n1, 1, d, 4)  # with the input, beside the result
    # the result's values: the dense path copies them out of its buffer; the sparse path's
    # coalesce keeps the selected rows when one replica has no duplicates
    result = n1 * d * 4 if rows == n1 else 0
    assert abs((held - input_ + result) / (count.peak - input_) - 1) < 0.05, (held, count.peak)


def test_grad_sync_counts_only_beyond_the_activation_phase(monkeypatch):
    # EP 1 over 2 ranks: reduce_rows runs on replicated tables; on one rank nothing is summed
    s2 = setup(n=65536, d=64, heads=8, topk=16, ep=1, world_size=2, tokens_per_rank=128)
    assert mm.reduce_rows_bytes(setup(n=65536, d=64, heads=8, topk=16, ep=1,
                                      tokens_per_rank=128)) == 0
    n1, union = mm.replica_rows(s2), mm.touched_rows(s2)
    assert n1 < union < 65536 and n1 * 2 < 65536  # the sparse path at these sizes
    assert mm.reduce_rows_bytes(s2) == int(8 * n1 * (64 * 4 + 8))
    # the rows arrive in order (only marked coalesced) and the 1/W scale is in place
    sync = mm.reduce_rows_bytes(s2)
    assert mm.grad_sync_bytes(s2) == max(0, sync - mm.activation_bytes(s2) - mm.a2a_bytes(s2))
    # fetch's served-row gradients are coalesced: a copy of the touched rows
    # (the phases before it taken away, so the term itself shows)
    f = setup(n=65536, d=64, heads=8, topk=16, ep=2, world_size=2, tokens_per_rank=128,
              strategy="fetch")
    d = setup(n=65536, d=64, heads=8, topk=16, ep=2, world_size=2, tokens_per_rank=128)
    monkeypatch.setattr(mm, "activation_bytes", lambda s: 0)
    monkeypatch.setattr(mm, "a2a_bytes", lambda s: 0)
    assert mm.grad_sync_bytes(f) == int(mm.touched_rows(f) * (64 * 4 + 8)) > 0
    assert mm.grad_sync_bytes(d) == 0


def test_fetch_keeps_distinct_rows_in_the_tables_dtype():
    """The fetch term: every layer keeps the R distinct rows it fetched, U and V, in the
    tables' dtype; R from counted uniform ids."""
    import torch

    from peer_dist.parallel import cost

    n, t, sel = 65536, 1024, 32
    g = torch.Generator().manual_seed(1)
    counted = torch.unique(torch.randint(0, n, (t * sel,), generator=g)).numel()
    assert abs(cost.expected_distinct(n, t * sel) / counted - 1) < 0.01
    for tdt, e in (("fp32", 4), ("bf16", 2)):
        s = setup(n=n, d=64, heads=4, topk=8, ep=2, world_size=2, strategy="fetch",
                  tokens_per_rank=t, table_dtype=tdt)
        assert abs(mm.a2a_bytes(s) / (counted * 2 * 64 * e) - 1) < 0.01


def _routed(strategy: str = "fetch") -> mm.Setup:
    m = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=32,
                    peer_blocks="all", peer=PEERConfig(num_experts=4096, heads=2, topk=4))
    return mm.Setup(m, ep=2, world_size=4, strategy=strategy, tokens_per_rank=128)


def test_routing_law_counts_rows_of_fewer_queries_and_is_found_from_a_run():
    s = _routed()
    # uniform: 4096 rows, 128 x 4 ranks x 8 selections drawn; the shard holds half of them
    draws = 128 * 4 * 8
    assert mm.touched_rows(s) == pytest.approx(2048 * 4096 * (1 - (1 - 1 / 4096) ** draws)
                                               / 4096)
    # the law D = 3 T^0.5 W^0.8 N^0.1: 128 tokens on each of 4 ranks, N = 4096
    law = mm.Setup(**{**s.__dict__, "routing": (3.0, 0.5, 0.8, 0.1)})

    def queries(ranks):
        return 3.0 * 128 ** 0.5 * ranks ** 0.8 * 4096 ** 0.1

    assert mm.touched_rows(law) == pytest.approx(2048 * (1 - (1 - 1 / 4096) ** (queries(4) * 8)))
    # one replica (the EP group's 2 ranks) and fetch's own tokens (1 rank) count the same way
    assert mm.replica_rows(law) == pytest.approx(2048 * (1 - (1 - 1 / 4096) ** (queries(2) * 8)))
    fetched = 4096 * (1 - (1 - 1 / 4096) ** (queries(1) * 8))
    assert mm.a2a_bytes(law) == int(2 * fetched * 2 * 32 * 4)
    assert mm.breakdown(law)["total"] < mm.breakdown(s)["total"]
    # never more queries than tokens
    many = mm.Setup(**{**s.__dict__, "routing": (50.0, 0.9, 1.0, 0.0)})
    assert mm.distinct_queries(many, 4) == 128 * 4
    # a run's count gives back K (the exponents kept); as many rows as uniform, or more: None
    k, *exps = mm.routing_for(law, mm.touched_rows(law))
    assert (k, exps) == (pytest.approx(3.0, rel=1e-6), [0.5, 0.8, 0.1])
    assert mm.routing_for(s, mm.touched_rows(s) + 5) is None
    assert mm.routing_for(s, mm.touched_rows(law))[1:] == mm.DEFAULT_ROUTING


def test_routing_law_fit_recovers_a_planted_law_from_counted_rows():
    """fit_routing reads D from each count (the inverse of the uniform draw), skips counts at
    the shard's size, and fits log D = log K + beta log T + gamma log W + delta log N; an
    exponent whose factor does not vary keeps its default."""
    base = _routed()
    planted = (1.5, 0.6, 0.8, 0.1)  # below one query per token at every point
    points, counts = [], []
    for tokens, world, ep, n in ((64, 1, 1, 4096), (256, 2, 1, 16384), (1024, 2, 2, 4096),
                                 (512, 4, 2, 65536), (2048, 1, 1, 65536)):
        m = ModelConfig(dim=32, n_layers=2, n_heads=2, peer_blocks="all",
                        peer=PEERConfig(num_experts=n, heads=2, topk=4))
        p = mm.Setup(m, tokens_per_rank=tokens, world_size=world, ep=ep, routing=planted)
        points.append(p)
        counts.append(mm.touched_rows(p))
    saturated = mm.Setup(**{**base.__dict__, "tokens_per_rank": 8192, "ep": 1})
    points.append(saturated)
    counts.append(4096.0)  # all rows: says nothing of D
    assert mm.implied_queries(saturated, 4096.0) is None
    got = mm.fit_routing(points, counts)
    assert got == pytest.approx(planted, rel=1e-6)
    # one rank and one N: only K and beta are fitted
    one = [p for p in points if p.world_size == 1 and p.n == 4096][:1] + [
        mm.Setup(**{**points[0].__dict__, "tokens_per_rank": 512})]
    k, beta, gamma, delta = mm.fit_routing(one, [mm.touched_rows(p) for p in one])
    assert (beta, gamma, delta) == (pytest.approx(0.6), 1.0, 0.0)
    with pytest.raises(ValueError, match="fewer than 2 token counts"):
        mm.fit_routing(points[:1] + [saturated], counts[:1] + [4096.0])


def test_the_gradient_sync_counts_the_rows_routing_touched():
    from types import SimpleNamespace

    import torch

    from peer_dist.parallel.comm import CommStats
    from peer_dist.parallel.grad_sync import sync_layer_grads

    u, v = torch.zeros(10, 3, requires_grad=True), torch.zeros(10, 3, requires_grad=True)
    m = SimpleNamespace(topo=SimpleNamespace(dp=1, world_size=2), stats=CommStats(),
                        shard=SimpleNamespace(params=lambda: [u, v]))
    for rows in ([1, 4, 4, 7], [2]):  # a row selected twice is one row of the gradient
        for t in (u, v):
            t.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.ones(len(rows), 3),
                                             (10, 3), check_invariants=True)
        sync_layer_grads(m)
    assert (m.stats.grad_rows, m.stats.grad_syncs) == (3 + 1, 2)
    assert m.stats.as_dict()["grad_rows"] == 2.0
    # the mix's backward applied the 1/W (ShardedExperts.table_scale): the sync keeps values
    assert torch.equal(u.grad.to_dense()[2], torch.ones(3))


def test_activations_peak_at_the_backward_start_or_at_the_query_bn():
    """The backward's two peaks by hand: at its start (everything saved, one block's
    gradients, the logits' softmax) and, on two ranks, at the last PEER block's query BN
    (the blocks after it, the logits and that block's per-selection tensors freed; the BN's
    float64 sums added)."""
    zero = {"token": 0, "local": 0, "fetch": 0, "dispatch": 0}
    d, m, v, t, sel = 64, 4, 256, 256, 8 * 16
    one = setup(n=4096, d=d, tokens_per_rank=t, scratch=zero)
    dense = (13 + 2 * m) * d * 4
    peer = 13 * d * 4 + 2 * 8 * 128 * 4 + sel * (40 + 6 * 4)
    head = 3 * d * 4
    start = 3 * dense + peer + head + 4 * v + peer + 2 * 4 * v  # PEER is block 2 of 4
    assert (one.model.ffw_mult, one.model.vocab_size, one.model.peer.d_key) == (m, v, 128)
    assert mm.activation_bytes(one) == t * start
    two = setup(n=4096, d=d, tokens_per_rank=t, scratch=zero, world_size=2)
    bn = t * 8 * 128 * (3 * 8 + 2 * 4)
    at_bn = 2 * dense + peer - sel * (40 + 6 * 4) + head + peer
    assert mm.sync_bn_bytes(two) == bn
    assert mm.activation_bytes(two) == max(t * start, t * at_bn + bn) == t * at_bn + bn
    # the PEER block last: nothing after it to free but the logits
    last = setup(n=4096, d=d, tokens_per_rank=t, scratch=zero, world_size=2, peer_blocks="3")
    at_bn_last = 3 * dense + peer - sel * (40 + 6 * 4) + head + peer
    assert mm.activation_bytes(last) == t * at_bn_last + bn
