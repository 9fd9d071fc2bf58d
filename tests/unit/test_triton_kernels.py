"""The Triton kernels of the expert mix against the same oracles as the C and PyTorch paths:
the paper's Algorithm 1 (the whole layer) and plain autograd on gathered rows, in fp32 and with
bf16 activations and/or bf16 tables; hot rows, empty bags, NaN and inf, bad ids.

On a machine without a GPU they run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py); with one, on CUDA. Every test checks that the
Triton kernels really ran (a spy on their launch functions).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_peer_layer import CASES, _fast_params, _grad, algorithm1

from peer_dist.config import PEERConfig
from peer_dist.model.peer import PEER
from peer_dist.ops import peer_mix, ragged_mix, triton_mix
from peer_dist.ops.paths import kernel_path

pytestmark = pytest.mark.skipif(not triton_mix.installed(), reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def launches(monkeypatch):
    """Counts of each Triton launch function's calls."""
    counts = {"forward": 0, "backward_bags": 0, "row_grads": 0}
    for name in counts:
        real = getattr(triton_mix, name)

        def spy(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(triton_mix, name, spy)
    return counts


def _reference(x, rows, bag, gates, u, v, act, grad_y):
    """Plain autograd in float64 on gathered rows: y and the grads of (x, gates, u, v)."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, gates, u, v)]
    xx, gg, uu, vv = leaves
    rows, bag = rows.cpu(), bag.cpu()
    s = (xx[bag] * uu[rows]).sum(-1)
    w = gg * (F.gelu(s) if act == "gelu" else F.relu(s))
    y = torch.zeros_like(xx).index_add(0, bag, w[:, None] * vv[rows])
    return [y.detach()] + list(torch.autograd.grad((y * grad_y.double().cpu()).sum(), leaves))


def _dense(g: torch.Tensor) -> torch.Tensor:
    return (g.to_dense() if g.is_sparse else g).double().cpu()


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 4, 6)], ids=["c0", "c1", "c4", "c6"])
def test_layer_matches_algorithm1(case, launches):
    n_exp, d, h, k, q, t, opts = case
    cfg = PEERConfig(num_experts=n_exp, heads=h, topk=k, d_key=q, **opts)
    torch.manual_seed(0)
    layer = PEER(d, cfg, seed=0, table_device="cpu")
    if cfg.query_batchnorm:
        layer.router.norm.weight.data.uniform_(0.5, 1.5)
        layer.router.norm.bias.data.normal_()
    ref = {name: p.detach().double().clone().requires_grad_()
           for name, p in _fast_params(layer).items()}
    layer.to(DEVICE)
    fast = _fast_params(layer)
    x = torch.randn(t, d, device=DEVICE, requires_grad=True)
    x_ref = x.detach().double().cpu().requires_grad_()
    grad_y = torch.randn(t, d, device=DEVICE)
    with kernel_path("triton"):
        y = layer(x)
        (y * grad_y).sum().backward()
    y_ref = algorithm1(x_ref, ref, cfg)
    (y_ref * grad_y.double().cpu()).sum().backward()
    assert launches == {"forward": 1, "backward_bags": 1, "row_grads": 1}
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double().cpu(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double().cpu(), x_ref.grad, **tol)
    for name, p in fast.items():
        torch.testing.assert_close(_grad(p).double().cpu(), ref[name].grad, **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert layer.experts.u.grad.is_sparse and layer.experts.v.grad.is_sparse


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
          (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("x_dtype,table_dtype", DTYPES,
                         ids=["fp32", "bf16-act", "bf16-tables", "bf16-both"])
def test_ragged_mix_dtypes(act, x_dtype, table_dtype, launches):
    """Bags of uneven size (one empty, one with a repeated row), sums in fp32 whatever the
    dtypes: against float64 autograd on the same (rounded) inputs; each gradient in its
    parameter's dtype, the tables' row-sparse and times table_scale (a sharded layer's 1/W)."""
    torch.manual_seed(5)
    sizes = [3, 0, 5, 1, 7, 2]
    bag = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(DEVICE)
    x = torch.randn(len(sizes), 24, device=DEVICE).to(x_dtype).requires_grad_()
    u = (torch.randn(30, 24, device=DEVICE) * 0.5).to(table_dtype).requires_grad_()
    v = torch.randn(30, 24, device=DEVICE).to(table_dtype).requires_grad_()
    rows = torch.randint(0, 30, (bag.numel(),), device=DEVICE)
    rows[1] = rows[0]
    gates = torch.rand(bag.numel(), device=DEVICE).to(x_dtype).requires_grad_()
    grad_y = torch.randn(len(sizes), 24, device=DEVICE).to(x_dtype)
    with kernel_path("triton"):
        y = ragged_mix(x, rows, bag, gates, u, v, act, table_scale=0.3)
        got = torch.autograd.grad((y * grad_y).sum(), [x, gates, u, v])
    assert launches["forward"] == 1 and launches["row_grads"] == 1
    want = _reference(x, rows, bag, gates, u, v, act, grad_y)
    want[3:] = [w * 0.3 for w in want[3:]]
    assert y.dtype == x_dtype and [g.dtype for g in got] == [x_dtype, x_dtype] + [table_dtype] * 2
    assert got[2].is_sparse and got[3].is_sparse
    low = torch.bfloat16 in (x_dtype, table_dtype)
    for name, g, w in zip(["y", "x", "gates", "u", "v"], [y, *got], want, strict=True):
        scale = float(w.abs().max()) + 1e-6
        atol = 1e-2 * scale if low else 1e-5 * scale  # bf16 results are rounded once: 2^-8
        torch.testing.assert_close(_dense(g), w, rtol=0, atol=atol, msg=f"{name} differs")
    assert y[1].abs().max() == 0  # the empty bag


def test_hot_row_and_empty_batch(launches):
    """Every token on the same row (one long run per row in the gradient kernel) and no tokens
    at all."""
    torch.manual_seed(6)
    x = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    u = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    ids = torch.full((40, 4), 3, device=DEVICE)
    ids[:, 0] = 5
    gates = torch.rand(40, 4, device=DEVICE, requires_grad=True)
    grad_y = torch.randn(40, 16, device=DEVICE)
    with kernel_path("triton"):
        y = peer_mix(x, ids, gates, u, v)
        got = torch.autograd.grad((y * grad_y).sum(), [x, gates, u, v])
        empty = peer_mix(x[:0], ids[:0], gates[:0], u, v)
    bag = torch.arange(40, device=DEVICE).repeat_interleave(4)
    want = _reference(x, ids.reshape(-1), bag, gates.reshape(-1), u, v, "gelu", grad_y)
    torch.testing.assert_close(y.double().cpu(), want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want[1:], strict=True):
        torch.testing.assert_close(_dense(g).reshape(w.shape), w, rtol=1e-5, atol=1e-4)
    assert sorted(got[2].coalesce().indices()[0].tolist()) == [3, 5]
    assert empty.shape == (0, 16)


def test_nan_and_inf_propagate_as_in_pytorch(launches):
    torch.manual_seed(7)
    x = torch.randn(6, 8, device=DEVICE)
    x[1, 2] = float("nan")
    gates = torch.rand(6, 3, device=DEVICE)
    gates[4, 0] = float("inf")
    u, v = torch.randn(10, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    ids = torch.randint(0, 10, (6, 3), device=DEVICE)
    outs = {}
    for path in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, gates, u, v)]
        with kernel_path(path):
            y = peer_mix(leaves[0], ids, leaves[1], leaves[2], leaves[3], "relu",
                         sparse_grad=False)
            y.sum().backward()
        outs[path] = [y.detach().cpu()] + [t.grad.cpu() for t in leaves]
    assert launches["forward"] == 1
    for a, b in zip(outs["triton"], outs["torch"], strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert outs["triton"][0][1].isnan().all() and not outs["triton"][0][0].isnan().any()


def test_bad_ids_are_refused_and_never_read():
    """peer_mix refuses ids outside [0, N) before any launch; the kernels themselves mask such
    rows (they read nothing there and add nothing), whatever reaches them."""
    u, v = torch.randn(10, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    x, gates = torch.randn(2, 8, device=DEVICE), torch.rand(2, 3, device=DEVICE)
    for bad in (-1, 10, 2**40):
        ids = torch.tensor([[0, bad, 2], [3, 4, 5]], device=DEVICE)
        with kernel_path("triton"), pytest.raises(IndexError, match=r"\[0, 10\)"):
            peer_mix(x, ids, gates, u, v)
        rows = ids.reshape(-1)
        offs = torch.tensor([0, 3, 6], device=DEVICE)
        y, pre = triton_mix.forward(x, rows, offs, gates.reshape(-1), u, v, True)
        ok = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], device=DEVICE)
        safe = ids.clamp(0, 9)
        want = torch.einsum("ts,tsd->td", gates * ok * F.gelu(
            torch.einsum("td,tsd->ts", x, u[safe])), v[safe])
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d,table_dtype,part_cols", [
    (300, torch.float32, 128),  # three column parts: the two-pass kernels
    (300, torch.bfloat16, 128),  # 600-byte rows: 8-byte loads (the fallback), three parts
    (13, torch.float32, 1024),  # odd d: one value a lane, a padded chunk
    (40, torch.bfloat16, 1024),  # two rows a warp (short rows)
], ids=["parts-fp32", "parts-bf16-narrow", "odd-d", "two-rows-a-warp"])
def test_column_parts_and_narrow_rows(d, table_dtype, part_cols, launches, monkeypatch):
    """The launch shapes plan() picks for wide rows (several column parts), rows whose bytes
    are not a multiple of 16, odd d and short rows, against float64 autograd."""
    monkeypatch.setattr(triton_mix, "PART_COLS", part_cols)
    pl = triton_mix.plan(d, table_dtype)
    assert (pl.PARTS > 1) == (part_cols == 128)
    torch.manual_seed(8)
    sizes = [9, 0, 17, 3]  # bags longer than a tile, an empty one
    bag = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(DEVICE)
    x = torch.randn(len(sizes), d, device=DEVICE, requires_grad=True)
    u = (torch.randn(20, d, device=DEVICE) * d ** -0.5).to(table_dtype).requires_grad_()
    v = torch.randn(20, d, device=DEVICE).to(table_dtype).requires_grad_()
    rows = torch.randint(0, 20, (bag.numel(),), device=DEVICE)
    rows[:5] = 7  # a hot row: one warp walks five selections
    gates = torch.rand(bag.numel(), device=DEVICE, requires_grad=True)
    grad_y = torch.randn(len(sizes), d, device=DEVICE)
    with kernel_path("triton"):
        y = ragged_mix(x, rows, bag, gates, u, v)
        got = torch.autograd.grad((y * grad_y).sum(), [x, gates, u, v])
    assert launches == {"forward": 1, "backward_bags": 1, "row_grads": 1}
    want = _reference(x, rows, bag, gates, u, v, "gelu", grad_y)
    low = table_dtype == torch.bfloat16
    for name, g, w in zip(["y", "x", "gates", "u", "v"], [y, *got], want, strict=True):
        atol = (1e-2 if low and name in "uv" else 1e-5) * (float(w.abs().max()) + 1e-6)
        torch.testing.assert_close(_dense(g), w, rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")
