"""Row-sparse table optimizer against torch's own optimizers and a hand-checked Adagrad."""

from __future__ import annotations

import pytest
import torch

from peer_dist.ops import cpu as fused_cpu
from peer_dist.train.sparse_optim import RowSparseOptimizer, grad_sq_norm, scale_grads

N, D = 40, 6


@pytest.fixture(autouse=True, params=["fused", "torch"])
def kernel_path(request):
    """Every test runs on the fused CPU row updates and on the pure-PyTorch ones."""
    if request.param == "fused" and fused_cpu.library() is None:
        pytest.skip("no C compiler: fused CPU kernels unavailable")
    fused_cpu.use_fused_cpu(request.param == "fused")
    torch.manual_seed(0)  # tests draw tables with torch.randn: same draws on every run
    yield request.param
    fused_cpu.use_fused_cpu(None)


def _sparse_grad(rows: list[int], seed: int, coalesced: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(rows)
    values = torch.randn(len(rows), D, generator=g, dtype=torch.float64)
    out = torch.sparse_coo_tensor(idx[None], values, (N, D), check_invariants=True)
    return out.coalesce() if coalesced else out


STEPS = [[0, 3, 7], [3, 4, 39], [7, 3, 3, 10], [1, 2], [0, 39, 20]]  # step 3 has a duplicate


def _run(opt_ours, opt_ref, p_ours, p_ref, dense_ref: bool):
    for i, rows in enumerate(STEPS):
        g = _sparse_grad(rows, seed=i, coalesced=i != 2)
        p_ours.grad = g.clone()
        p_ref.grad = g.to_dense() if dense_ref else g.coalesce()
        opt_ours.step()
        opt_ref.step()
        torch.testing.assert_close(p_ours, p_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
def test_dense_adam_equals_torch_adam(betas):
    init = torch.randn(N, D, dtype=torch.float64)
    p_ours, p_ref = init.clone().requires_grad_(), init.clone().requires_grad_()
    ours = RowSparseOptimizer([p_ours], kind="dense_adam", lr=0.01, betas=betas, eps=1e-8)
    ref = torch.optim.Adam([p_ref], lr=0.01, betas=betas, eps=1e-8)
    _run(ours, ref, p_ours, p_ref, dense_ref=True)


def test_lazy_adam_equals_sparse_adam_and_touches_only_rows():
    init = torch.randn(N, D, dtype=torch.float64)
    p_ours, p_ref = init.clone().requires_grad_(), init.clone().requires_grad_()
    # tiny eps: torch's SparseAdam adds eps before dividing by sqrt(bias correction), Adam (and
    # ours) after; they agree exactly as eps -> 0 (SparseAdam refuses eps = 0)
    ours = RowSparseOptimizer([p_ours], kind="lazy_adam", lr=0.01, eps=1e-30)
    ref = torch.optim.SparseAdam([p_ref], lr=0.01, eps=1e-30)
    _run(ours, ref, p_ours, p_ref, dense_ref=False)
    state = ours.state[p_ours]
    touched = sorted({r for rows in STEPS for r in rows})
    untouched = [r for r in range(N) if r not in touched]
    assert torch.equal(p_ours.detach()[untouched], init[untouched])
    assert not state["exp_avg"][untouched].any() and not state["exp_avg_sq"][untouched].any()
    assert state["exp_avg_sq"][touched].gt(0).all()


def test_lazy_adam_with_eps_close_to_sparse_adam():
    init = torch.randn(N, D, dtype=torch.float64)
    p_ours, p_ref = init.clone().requires_grad_(), init.clone().requires_grad_()
    ours = RowSparseOptimizer([p_ours], kind="lazy_adam", lr=0.01, eps=1e-8)
    ref = torch.optim.SparseAdam([p_ref], lr=0.01, eps=1e-8)
    for i, rows in enumerate(STEPS):
        g = _sparse_grad(rows, seed=i)
        p_ours.grad, p_ref.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p_ours, p_ref, rtol=1e-6, atol=1e-7)


def _coo(rows: list, values: list) -> torch.Tensor:
    return torch.sparse_coo_tensor(rows, torch.tensor(values, dtype=torch.float64), (4, 2),
                                   check_invariants=True)


def test_adagrad_hand_checked():
    p = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    opt = RowSparseOptimizer([p], kind="adagrad", lr=0.5, eps=0.0)
    # step 1: row 1 grad (3, 4): row accumulator = mean(9, 16) = 12.5
    p.grad = _coo([[1]], [[3.0, 4.0]])
    opt.step()
    want = torch.zeros(4, 2, dtype=torch.float64)
    want[1] = -0.5 * torch.tensor([3.0, 4.0]) / 12.5 ** 0.5
    torch.testing.assert_close(p.detach(), want)
    # step 2: rows 1 and 3; row 1 acc = 12.5 + mean(1, 1) = 13.5, row 3 acc = mean(4, 0) = 2
    p.grad = _coo([[3, 1]], [[2.0, 0.0], [1.0, -1.0]])
    opt.step()
    want[1] -= 0.5 * torch.tensor([1.0, -1.0]) / 13.5 ** 0.5
    want[3] = -0.5 * torch.tensor([2.0, 0.0]) / 2.0 ** 0.5
    torch.testing.assert_close(p.detach(), want)
    torch.testing.assert_close(opt.state[p]["sum_sq"],
                               torch.tensor([0.0, 13.5, 0.0, 2.0], dtype=torch.float64))


def test_adagrad_sparse_equals_dense_grad():
    init = torch.randn(N, D, dtype=torch.float64)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    oa = RowSparseOptimizer([a], kind="adagrad", lr=0.1)
    ob = RowSparseOptimizer([b], kind="adagrad", lr=0.1)
    for i, rows in enumerate(STEPS):
        g = _sparse_grad(rows, seed=i)
        a.grad, b.grad = g.clone(), g.to_dense()
        oa.step()
        ob.step()
    # dense grads include explicit zero rows, whose update is 0 / (sqrt(acc) + eps) = 0
    torch.testing.assert_close(a, b)


def test_sgd_and_unknown_kind():
    p = torch.ones(N, D, dtype=torch.float64, requires_grad=True)
    opt = RowSparseOptimizer([p], kind="sgd", lr=0.5)
    p.grad = _sparse_grad([2, 5, 2], seed=0, coalesced=False)
    opt.step()
    torch.testing.assert_close(p.detach(), 1 - 0.5 * p.grad.to_dense())
    with pytest.raises(ValueError, match="lazy_adam"):
        RowSparseOptimizer([p], kind="adamw")


def test_grad_norm_and_scaling():
    p = torch.zeros(N, D, dtype=torch.float64, requires_grad=True)
    p.grad = _sparse_grad([1, 1, 4], seed=3, coalesced=False)
    dense = p.grad.to_dense()
    torch.testing.assert_close(grad_sq_norm([p]), dense.pow(2).sum())
    scale_grads([p], 0.5)
    torch.testing.assert_close(p.grad.to_dense(), dense * 0.5)


def test_float32_tables_and_state_dtype():
    p = torch.randn(N, D, requires_grad=True)
    opt = RowSparseOptimizer([p], kind="lazy_adam", lr=0.1)
    state = opt.init_state(p)
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == (N, D)
    p.grad = _sparse_grad([3], seed=0).float()
    before = p.detach().clone()
    opt.step()
    changed = (p.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3]


def _bf16_pair(kind: str, betas=(0.9, 0.95)):
    """fp32 tables with fp32 state (the reference) and with bf16 state, same start."""
    init = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    p32, p16 = init.clone().requires_grad_(), init.clone().requires_grad_()
    o32 = RowSparseOptimizer([p32], kind=kind, lr=0.01, betas=betas)
    o16 = RowSparseOptimizer([p16], kind=kind, lr=0.01, betas=betas, state_dtype=torch.bfloat16)
    return init, p32, p16, o32, o16


def _step_both(p32, p16, o32, o16, i: int, rows: list[int], round_ref: bool) -> None:
    g = _sparse_grad(rows, seed=i, coalesced=i != 2).float()
    p32.grad, p16.grad = g.clone(), g.clone()
    o32.step()
    o16.step()
    if round_ref:  # emulate bf16 storage on the fp32 reference: round its state after each step
        for t in o32.state[p32].values():
            if t.is_floating_point() and t.dim() > 0:
                t.copy_(t.bfloat16())


@pytest.mark.parametrize("kind", ["lazy_adam", "dense_adam", "adagrad"])
def test_bf16_state_equals_fp32_math_on_rounded_state(kind):
    # bf16 state = fp32 update math on the upcast rows, written back rounded to nearest: an fp32
    # optimizer whose state is rounded to bf16 after every step must agree to fp32 rounding.
    _, p32, p16, o32, o16 = _bf16_pair(kind)
    for i, rows in enumerate(STEPS):
        _step_both(p32, p16, o32, o16, i, rows, round_ref=True)
        torch.testing.assert_close(p16, p32, rtol=1e-6, atol=1e-7)
    for name, t in o16.state[p16].items():
        if name != "step":  # at most one bf16 unit apart (an fp32 tie may round either way)
            torch.testing.assert_close(t.float(), o32.state[p32][name], rtol=2 ** -7, atol=0)


def test_bf16_lazy_adam_tracks_fp32_and_keeps_untouched_rows():
    init, p32, p16, o32, o16 = _bf16_pair("lazy_adam", betas=(0.9, 0.999))
    state = o16.init_state(p16)
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (N, D)
    for i, rows in enumerate(STEPS):
        _step_both(p32, p16, o32, o16, i, rows, round_ref=False)
    # each step moves a touched entry by ~lr = 0.01; bf16 moments (relative error <= 2^-8)
    # change an update by well under 2 %, so 5 steps stay within 2e-4 of the fp32 run, while a
    # missing bias correction, a dropped write-back or a wrong row would be off by ~lr
    touched = sorted({r for rows in STEPS for r in rows})
    untouched = [r for r in range(N) if r not in touched]
    moved = (p32.detach() - init)[touched].abs()
    assert moved.mean() > 5e-3
    torch.testing.assert_close(p16, p32, rtol=0, atol=2e-4)
    assert (p16.detach() - p32.detach()).abs().max() < 0.1 * moved.mean()
    assert torch.equal(p16.detach()[untouched], init[untouched])
    assert not state["exp_avg"][untouched].any() and not state["exp_avg_sq"][untouched].any()
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[name].float(), o32.state[p32][name], rtol=2e-2,
                                   atol=1e-6)


def test_bf16_adagrad_state_is_one_bf16_per_row():
    p = torch.zeros(N, D, requires_grad=True)
    opt = RowSparseOptimizer([p], kind="adagrad", lr=0.1, state_dtype=torch.bfloat16)
    assert opt.init_state(p)["sum_sq"].dtype == torch.bfloat16
    assert opt.state[p]["sum_sq"].shape == (N,)
    with pytest.raises(ValueError, match="bfloat16"):
        RowSparseOptimizer([p], kind="adagrad", state_dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lazy_adam_row_bias_correction(dtype):
    """bias_correction="row": each row is corrected by its own update count, so a row first
    touched late moves by lr per element on its first step (sign(g) * lr, as a fresh Adam);
    "global" moves it by (1-b1)/(1-b1^t) / sqrt((1-b2)/(1-b2^t)) x lr instead (0.45x here).
    Rows touched every step agree between the two."""
    betas, lr, late = (0.9, 0.95), 0.01, 12
    moved = {}
    for mode in ("global", "row"):
        p = torch.zeros(N, D, dtype=dtype, requires_grad=True)
        opt = RowSparseOptimizer([p], "lazy_adam", lr=lr, betas=betas, eps=1e-30,
                                 bias_correction=mode)
        for step in range(late):
            rows = [0] if step < late - 1 else [0, 5]  # row 5 first touched at step 12
            g = torch.sparse_coo_tensor(torch.tensor([rows]), torch.ones(len(rows), D,
                                                                         dtype=dtype), (N, D),
                                        check_invariants=True)
            p.grad = g
            opt.step()
        moved[mode] = p.detach()
        if mode == "row":
            counts = opt.state[p]["row_step"]
            assert counts.dtype == torch.int32
            assert counts[0] == late and counts[5] == 1 and int(counts.sum()) == late + 1
        else:
            assert "row_step" not in opt.state[p]
    t = late
    expect_global = lr * (1 - betas[0]) / (1 - betas[0] ** t) / (
        ((1 - betas[1]) / (1 - betas[1] ** t)) ** 0.5)
    tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(-moved["row"][5], torch.full((D,), lr, dtype=dtype), **tol)
    torch.testing.assert_close(-moved["global"][5], torch.full((D,), expect_global, dtype=dtype),
                               **tol)
    assert 0.4 < expect_global / lr < 0.5
    torch.testing.assert_close(moved["row"][0], moved["global"][0], **tol)


def test_bias_correction_is_checked():
    with pytest.raises(ValueError, match=r"bias_correction='step'.*\['global', 'row'\]"):
        RowSparseOptimizer([torch.zeros(2, 2, requires_grad=True)], bias_correction="step")


@pytest.mark.parametrize("kind", ["lazy_adam", "dense_adam", "adagrad", "sgd"])
def test_bf16_tables_update_in_fp32_and_round_once(kind, kernel_path, monkeypatch):
    """model.peer.table_dtype=bf16: the update is computed in fp32 from the bf16 table and the
    (bf16) gradient, and rounded once into the table: exactly the fp32 update of the same
    values, rounded. The fp32 reference runs on the path under test: on "fused" the C row
    kernels (counted: they must run for the kinds that have one), which no bf16 table reaches."""
    calls = {"fp32": 0, "other": 0}

    def counted(name):
        real = getattr(fused_cpu, name)

        def spy(p, *args, **kwargs):
            calls["fp32" if p.dtype == torch.float32 else "other"] += 1
            return real(p, *args, **kwargs)
        monkeypatch.setattr(fused_cpu, name, spy)

    counted("adam_rows")
    counted("adagrad_rows")
    p16 = torch.nn.Parameter(torch.randn(N, D).to(torch.bfloat16))
    p32 = torch.nn.Parameter(p16.detach().float())
    opt16 = RowSparseOptimizer([p16], kind=kind, lr=0.01, betas=(0.9, 0.95))
    opt32 = RowSparseOptimizer([p32], kind=kind, lr=0.01, betas=(0.9, 0.95))
    for i, rows in enumerate(STEPS[:3]):
        g = _sparse_grad(rows, seed=i).to(torch.bfloat16).coalesce()
        p16.grad, p32.grad = g, g.float()
        opt16.step()
        opt32.step()
        assert p16.dtype == torch.bfloat16
        assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16)), f"step {i}"
        p32.data.copy_(p16.detach().float())  # both continue from the rounded table
    state = opt16.state[p16]
    assert all(t.dtype == torch.float32 for k, t in state.items() if k != "step")
    fused_kinds = {"lazy_adam", "adagrad"}  # dense_adam and sgd have no row kernel
    assert calls == {"fp32": 3 if kernel_path == "fused" and kind in fused_kinds else 0,
                     "other": 0}


def test_row_gradients_in_order_are_marked_coalesced_without_a_copy():
    """grad_sync.coalesced: a gradient whose rows are unique and ascending (the kernels'
    row_grad, whose flag autograd drops when it stores .grad) is marked coalesced over the
    same values; rows out of order or repeated (chunks concatenated) are summed as
    coalesce() sums them."""
    from peer_dist.ops.rows import coalesced

    vals = torch.randn(4, 3)
    ordered = torch.sparse_coo_tensor(torch.tensor([[1, 4, 5, 9]]), vals, (10, 3))
    assert not ordered.is_coalesced()
    got = coalesced(ordered)
    assert got.is_coalesced() and got._values().data_ptr() == vals.data_ptr()
    assert torch.equal(got.to_dense(), ordered.to_dense())
    for rows in ([[4, 1, 5, 9]], [[1, 4, 4, 9]]):
        g = torch.sparse_coo_tensor(torch.tensor(rows), vals, (10, 3))
        got = coalesced(g)
        want = g.coalesce()
        assert got.is_coalesced() and torch.equal(got._indices(), want._indices())
        assert torch.equal(got._values(), want._values())
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, 3),
                                    (10, 3))
    assert coalesced(empty)._nnz() == 0


def test_clipping_scales_row_gradients_in_place():
    """scale_grads: a sparse gradient's values are multiplied where they lie (rows in order:
    no sort, no copy); rows out of order are summed first; dense gradients in place too."""
    a, b, c = (torch.zeros(10, 3, requires_grad=True) for _ in range(3))
    vals = torch.randn(3, 3)
    a.grad = torch.sparse_coo_tensor(torch.tensor([[1, 5, 7]]), vals.clone(), (10, 3))
    b.grad = torch.sparse_coo_tensor(torch.tensor([[7, 1, 1]]), vals.clone(), (10, 3))
    c.grad = torch.randn(10, 3)
    want = [p.grad.to_dense() * 0.25 for p in (a, b, c)]
    storage = a.grad._values().data_ptr()
    scale_grads([a, b, c], 0.25)
    assert a.grad._values().data_ptr() == storage and a.grad.is_coalesced()
    for p, w in zip((a, b, c), want, strict=True):
        assert torch.equal(p.grad.to_dense(), w)
