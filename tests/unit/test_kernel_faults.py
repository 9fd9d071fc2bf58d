"""The kernels and the router never crash, whatever they are fed (hypothesis): NaN and inf in
the input, gates, tables and scores, empty batches, repeated and out-of-range ids.

Defined behaviour: NaN and inf propagate to the outputs and gradients exactly as the
pure-PyTorch path propagates them; product-key selection returns valid ids even on NaN scores
(NaN ranks above every number, as in torch.topk); an out-of-range id is an IndexError naming
the allowed range, raised before any table row is read. A crash here would kill the test
process, not fail one test: that is what these tests make impossible.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer_dist.config import PEERConfig
from peer_dist.model.peer import PEER, ProductKeyRouter
from peer_dist.ops import cpu as fused_cpu
from peer_dist.ops import peer_mix
from peer_dist.ops.paths import kernel_path
from peer_dist.train.sparse_optim import RowSparseOptimizer

pytestmark = pytest.mark.skipif(fused_cpu.library() is None, reason="no C compiler")
SETTINGS = settings(max_examples=40, deadline=None)
SPECIALS = [float("nan"), float("inf"), float("-inf")]


def sprinkle(t: torch.Tensor, data, label: str) -> torch.Tensor:
    """t with up to 3 entries set to NaN / inf / -inf (positions drawn by hypothesis)."""
    t = t.clone()
    if t.numel():
        for _ in range(data.draw(st.integers(0, 3), label=f"{label} specials")):
            i = data.draw(st.integers(0, t.numel() - 1), label=f"{label} index")
            t.view(-1)[i] = data.draw(st.sampled_from(SPECIALS), label=f"{label} value")
    return t


def run_mix(x, ids, gates, u, v, act):
    """Output and every gradient (x, gates, u, v dense) of a sum-of-outputs loss."""
    leaves = [t.clone().requires_grad_(True) for t in (x, gates, u, v)]
    y = peer_mix(leaves[0], ids, leaves[1], leaves[2], leaves[3], act, sparse_grad=False)
    y.sum().backward()
    return [y.detach()] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


@SETTINGS
@given(st.data())
def test_mix_with_nan_inf_empty_and_repeated_ids_matches_pytorch(data):
    t = data.draw(st.integers(0, 6), label="tokens")
    s = data.draw(st.integers(0, 5), label="selections")
    n, d = data.draw(st.sampled_from([(1, 3), (7, 4), (64, 8)]), label="rows, dim")
    act = data.draw(st.sampled_from(["gelu", "relu"]), label="act")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    ids = torch.randint(0, n, (t, s), generator=g)
    if t and s and data.draw(st.booleans(), label="repeat one id everywhere"):
        ids[:] = ids[0, 0]
    x = sprinkle(torch.randn(t, d, generator=g, dtype=torch.float64), data, "x")
    gates = sprinkle(torch.rand(t, s, generator=g, dtype=torch.float64), data, "gates")
    u = sprinkle(torch.randn(n, d, generator=g, dtype=torch.float64), data, "u")
    v = sprinkle(torch.randn(n, d, generator=g, dtype=torch.float64), data, "v")
    with kernel_path("torch"):
        want = run_mix(x, ids, gates, u, v, act)
    for name in ("c", "private"):
        with kernel_path(name):
            got = run_mix(x, ids, gates, u, v, act)
        for a, b, what in zip(got, want, ("y", "dx", "dgates", "du", "dv"), strict=True):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-9, atol=1e-9,
                                       msg=f"{name} {what}")


@pytest.mark.parametrize("name", ["c", "private", "torch"])
@pytest.mark.parametrize("bad", [-1, 64, 2**40, -(2**62)])
def test_out_of_range_ids_are_an_index_error(name, bad):
    ids = torch.tensor([[0, 5], [bad, 3]])
    x, gates, u = torch.randn(2, 8), torch.rand(2, 2), torch.randn(64, 8)
    with kernel_path(name), pytest.raises(IndexError):
        peer_mix(x, ids, gates, u, u.clone())


def test_fused_index_error_names_the_allowed_range():
    with kernel_path("c"), pytest.raises(IndexError, match=r"in \[0, 64\), got \[0, 70\]"):
        peer_mix(torch.randn(2, 8), torch.tensor([[0, 5], [70, 3]]), torch.rand(2, 2),
                 torch.randn(64, 8), torch.randn(64, 8))


def test_mismatched_shapes_are_a_value_error():
    x, u = torch.randn(3, 8), torch.randn(64, 8)
    with pytest.raises(ValueError, match="allowed are x"):
        peer_mix(x, torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 2), u, u)  # 5 != 3 tokens
    with pytest.raises(ValueError, match="allowed are x"):
        peer_mix(x, torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2), u, torch.randn(64, 4))


@SETTINGS
@given(st.data())
def test_pk_select_returns_valid_ids_on_any_scores(data):
    h = data.draw(st.integers(1, 3), label="heads")
    n = data.draw(st.sampled_from([4, 16, 64, 200]), label="sub-keys")
    k = data.draw(st.integers(1, min(n, 8)), label="k")
    t = data.draw(st.integers(1, 5), label="tokens")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    scores = torch.randn(2 * h, t, n, generator=g)
    fill = data.draw(st.sampled_from(["some", "row of nan", "all nan", "inf and -inf"]))
    if fill == "some":
        scores = sprinkle(scores, data, "scores")
    elif fill == "row of nan":
        scores[0, 0] = float("nan")
    elif fill == "all nan":
        scores[:] = float("nan")
    else:
        scores[..., 0], scores[..., -1] = float("inf"), float("-inf")
    router = ProductKeyRouter(8, PEERConfig(num_experts=n * n, heads=h, topk=k, d_key=4))
    pi, pj = router._pairs(torch.device("cpu"))
    sel1, sel2 = fused_cpu.pk_select(scores.contiguous(), pi, pj, k)
    for sel in (sel1, sel2):
        assert int(sel.min()) >= 0 and int(sel.max()) < n
    pairs = (sel1 * n + sel2).flatten(0, 1)
    assert all(len(set(row.tolist())) == k for row in pairs)  # k distinct experts per row


@pytest.mark.parametrize("name", ["c", "torch"])
@pytest.mark.parametrize("where", ["input", "sub_keys", "input_inf"])
def test_router_and_layer_propagate_nan_with_valid_ids(name, where):
    torch.manual_seed(0)
    cfg = PEERConfig(num_experts=1024, heads=2, topk=4, d_key=16)
    layer = PEER(32, cfg, table_device="cpu")
    x = torch.randn(6, 32)
    if where == "input":
        x[2, 3] = float("nan")
    elif where == "input_inf":
        x[1, 0] = float("inf")
    else:
        with torch.no_grad():
            layer.router.sub_keys[0, 0, 5] = float("nan")
    with kernel_path(name):
        ids, gates = layer.router(x)
        y = layer(x)
    assert int(ids.min()) >= 0 and int(ids.max()) < 1024
    assert not torch.isfinite(y).all()  # the non-finite value reached the output


def test_router_on_an_empty_batch():
    router = ProductKeyRouter(16, PEERConfig(num_experts=256, heads=2, topk=4, d_key=8))
    ids, gates = router(torch.zeros(0, 16))
    assert ids.shape == gates.shape == (0, 8)


@SETTINGS
@given(st.data())
def test_row_optimizers_take_nan_grads_and_refuse_bad_rows(data):
    kind = data.draw(st.sampled_from(["lazy_adam", "adagrad", "sgd"]), label="kind")
    state = data.draw(st.sampled_from([None, torch.bfloat16]), label="state dtype")
    n, d = 32, 8
    p = torch.nn.Parameter(torch.randn(n, d))
    opt = RowSparseOptimizer([p], kind, lr=0.1, state_dtype=state)
    rows = torch.tensor(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1,
                                                 max_size=6), label="rows")))
    values = sprinkle(torch.randn(len(rows), d), data, "grad")
    p.grad = torch.sparse_coo_tensor(rows[None], values, (n, d), check_invariants=True)
    opt.step()  # NaN goes into the touched rows, as torch's own optimizers do
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[rows] = False
    assert torch.isfinite(p.detach()[untouched]).all()
    bad = data.draw(st.sampled_from([-1, n, 10**12]), label="bad row")
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, bad]]), torch.randn(2, d), (n, d),
                                     check_invariants=False)
    with pytest.raises((IndexError, RuntimeError)):
        opt.step()
