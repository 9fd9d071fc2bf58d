"""The fast PEER layer against a literal Algorithm 1 (the paper's pseudo-code) in float64.

The oracle below is written the slow, obvious way: query -> BN -> per-head product-key
get_indices as in the PKM notebook -> gather w_down = U[indices], w_up = V[indices] as
(T, H, K, D) tensors -> einsum -> act -> * softmax(scores) -> einsum. The fast layer must match
its output and every gradient (x, query weight, BN affine, sub-keys, U, V).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peer_dist.config import PEERConfig
from peer_dist.model.peer import PEER
from peer_dist.ops import cpu as fused_cpu
from peer_dist.ops import mix as kernels
from peer_dist.ops import paths, rows


def get_indices(q: torch.Tensor, sub_keys: torch.Tensor, k: int, n: int):
    """PKM notebook: q (T, H, Q), sub_keys (H, 2, n, Q/2) -> indices, scores (T, H, K)."""
    half = q.shape[-1] // 2
    q1, q2 = q[..., :half], q[..., half:]
    s1 = torch.einsum("thd,hnd->thn", q1, sub_keys[:, 0])  # (T, H, n)
    s2 = torch.einsum("thd,hnd->thn", q2, sub_keys[:, 1])
    top1, idx1 = s1.topk(k, dim=-1)
    top2, idx2 = s2.topk(k, dim=-1)
    all_scores = (top1[..., :, None] + top2[..., None, :]).flatten(-2)  # (T, H, K*K)
    all_idx = (idx1[..., :, None] * n + idx2[..., None, :]).flatten(-2)
    scores, best = all_scores.topk(k, dim=-1)
    return all_idx.gather(-1, best), scores


def algorithm1(x, params: dict, cfg: PEERConfig) -> torch.Tensor:
    """The paper's Algorithm 1 for x (T, D) with the given (leaf) parameters."""
    t = x.shape[0]
    q = x @ params["query"].T  # (T, H*Q)
    if cfg.query_batchnorm:
        q = F.batch_norm(q, None, None, params["bn_w"], params["bn_b"], training=True)
    q = q.view(t, cfg.heads, cfg.d_key)
    keys = params["keys"].expand(cfg.heads, -1, -1, -1)
    indices, scores = get_indices(q, keys, cfg.topk, math.isqrt(cfg.num_experts))
    w_down = params["u"][indices]  # (T, H, K, D)
    w_up = params["v"][indices]
    h = torch.einsum("td,thkd->thk", x, w_down)
    h = F.gelu(h) if cfg.activation == "gelu" else F.relu(h)
    h = h * F.softmax(scores, dim=-1)
    return torch.einsum("thk,thkd->td", h, w_up)


def _fast_params(layer: PEER) -> dict:
    p = {"query": layer.router.query.weight, "keys": layer.router.sub_keys,
         "u": layer.experts.u, "v": layer.experts.v}
    if layer.cfg.query_batchnorm:
        p["bn_w"], p["bn_b"] = layer.router.norm.weight, layer.router.norm.bias
    return p


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


CASES = [  # (N, D, H, K, Q, T, options)
    (64, 8, 1, 2, 4, 5, {}),
    (256, 16, 4, 8, 16, 33, {}),
    (1024, 32, 8, 16, 32, 40, {}),
    (256, 16, 4, 8, 16, 33, {"shared_keys": True}),
    (256, 16, 2, 4, 8, 17, {"activation": "relu"}),
    (256, 16, 3, 5, 12, 21, {"query_batchnorm": False}),
    (400, 12, 2, 20, 6, 9, {"shared_keys": True, "activation": "relu",
                             "query_batchnorm": False}),
]


def kernel_path(path: str):
    """c: the compiled CPU kernels; private: PyTorch ops with the private aten gather-dot;
    torch: PyTorch ops only."""
    if path == "c" and fused_cpu.library() is None:
        pytest.skip("no C compiler: fused CPU kernels unavailable")
    return paths.kernel_path(path)


PATHS = ["c", "private", "torch"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_fast_layer_matches_algorithm1(case, seed, path):
    n_exp, d, h, k, q, t, opts = case
    cfg = PEERConfig(num_experts=n_exp, heads=h, topk=k, d_key=q, **opts)
    cfg.validate()
    torch.manual_seed(seed)
    layer = PEER(d, cfg, seed=seed, table_device="cpu").double()
    if cfg.query_batchnorm:  # non-trivial affine so its gradients are checked for real
        layer.router.norm.weight.data.uniform_(0.5, 1.5)
        layer.router.norm.bias.data.normal_()
    fast = _fast_params(layer)
    ref = {name: p.detach().clone().requires_grad_() for name, p in fast.items()}
    x = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_y = torch.randn(t, d, dtype=torch.float64)

    with kernel_path(path):
        y = layer(x)
        (y * grad_y).sum().backward()
    y_ref = algorithm1(x_ref, ref, cfg)
    (y_ref * grad_y).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for name, p in fast.items():
        assert p.grad is not None, name
        torch.testing.assert_close(_grad(p), ref[name].grad, rtol=1e-9, atol=1e-11,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert layer.experts.u.grad.is_sparse and layer.experts.v.grad.is_sparse


def test_table_grads_are_row_sparse():
    cfg = PEERConfig(num_experts=4096, heads=2, topk=4, d_key=8)
    layer = PEER(16, cfg, table_device="cpu")
    x = torch.randn(7, 16)
    ids, _ = layer.router(x)
    layer(x).sum().backward()
    for p in (layer.experts.u, layer.experts.v):
        assert p.grad.is_sparse
        rows = p.grad.coalesce().indices()[0]
        assert set(rows.tolist()) == set(ids.flatten().tolist())  # exactly the touched rows
        assert p.grad._nnz() <= 7 * 2 * 4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_peer_mix_paths_agree_with_dense_grads(path, dtype):
    """peer_mix (duplicate ids in a token, float32 too) against plain autograd on gathered rows,
    with sparse and dense table gradients."""
    torch.manual_seed(3)
    x = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    u, v = torch.randn(50, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype)
    ids, gates = torch.randint(0, 50, (6, 5)), torch.rand(6, 5, dtype=dtype, requires_grad=True)
    ids[0, 1] = ids[0, 0]
    grad_y = torch.randn(6, 8, dtype=dtype)
    uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
    y_ref = torch.einsum("ts,tsd->td", gates * F.gelu(torch.einsum("td,tsd->ts", x, uu[ids])),
                         vv[ids])
    want = torch.autograd.grad((y_ref * grad_y).sum(), [x, gates, uu, vv])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    for sparse in (True, False):
        uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
        with kernel_path(path):
            y = kernels.peer_mix(x, ids, gates, uu, vv, "gelu", sparse_grad=sparse)
            got = torch.autograd.grad((y * grad_y).sum(), [x, gates, uu, vv])
        torch.testing.assert_close(y, y_ref, **tol)
        assert got[2].is_sparse == sparse and got[3].is_sparse == sparse
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.to_dense() if g.is_sparse else g, w, **tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_ragged_mix_matches_plain_autograd(path, dtype, scale):
    """ragged_mix (dispatch's owner: bags of uneven size, an empty bag, a repeated row in a
    bag) against plain autograd on gathered rows; table_scale (a sharded layer's 1/W) scales
    the U and V gradients and nothing else."""
    torch.manual_seed(4)
    sizes = [3, 0, 5, 1, 7]  # selections per bag; bag 1 is empty
    bag = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.randn(len(sizes), 8, dtype=dtype, requires_grad=True)
    u, v = torch.randn(30, 8, dtype=dtype), torch.randn(30, 8, dtype=dtype)
    rows_ = torch.randint(0, 30, (bag.numel(),))
    rows_[1] = rows_[0]
    gates = torch.rand(bag.numel(), dtype=dtype, requires_grad=True)
    grad_y = torch.randn(len(sizes), 8, dtype=dtype)
    uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
    w = gates * F.gelu((x[bag] * uu[rows_]).sum(-1))
    y_ref = torch.zeros_like(x).index_add(0, bag, w[:, None] * vv[rows_])
    want = torch.autograd.grad((y_ref * grad_y).sum(), [x, gates, uu, vv])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
    with kernel_path(path):
        y = kernels.ragged_mix(x, rows_, bag, gates, uu, vv, "gelu", table_scale=scale)
        got = torch.autograd.grad((y * grad_y).sum(), [x, gates, uu, vv])
    torch.testing.assert_close(y, y_ref, **tol)
    assert y[1].abs().max() == 0  # the empty bag
    for g, ref, c in zip(got, want, [1.0, 1.0, scale, scale], strict=True):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, ref * c, **tol)


def test_ragged_mix_rejects_bad_bags():
    x, u = torch.randn(3, 4), torch.randn(10, 4)
    rows_, gates = torch.tensor([1, 2, 3]), torch.rand(3)
    for bag in ([0, 2, 1], [0, 1, 3], [-1, 0, 0]):  # decreasing, beyond P, negative
        with pytest.raises(IndexError, match=r"nondecreasing in \[0, 3\)"):
            kernels.ragged_mix(x, rows_, torch.tensor(bag), gates, u, u)
    with pytest.raises(ValueError, match="allowed are"):
        kernels.ragged_mix(x, rows_, torch.tensor([0, 1]), gates, u, u)


def test_peer_mix_rejects_out_of_range_ids():
    if fused_cpu.library() is None:
        pytest.skip("no C compiler: fused CPU kernels unavailable")
    u = v = torch.randn(10, 4)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        kernels.peer_mix(torch.randn(2, 4), torch.tensor([[0, 10], [1, 2]]), torch.ones(2, 2),
                         u, v)


def test_gather_dot_paths_agree():
    torch.manual_seed(0)
    x, w = torch.randn(13, 9), torch.randn(40, 9)
    ids = torch.randint(0, 40, (13, 6))
    want = torch.einsum("td,tsd->ts", x, w[ids])
    rows.use_private_gather_dot(False)
    try:
        torch.testing.assert_close(rows.gather_dot(x, ids, w, chunk_tokens=4), want)
    finally:
        rows.use_private_gather_dot(None)
    torch.testing.assert_close(rows.gather_dot(x, ids, w), want)


def test_shapes_and_empty_batch():
    cfg = PEERConfig(num_experts=256, heads=2, topk=4, d_key=8, query_batchnorm=False)
    layer = PEER(12, cfg, table_device="cpu")
    assert layer(torch.randn(2, 3, 12)).shape == (2, 3, 12)
    assert layer(torch.randn(0, 12)).shape == (0, 12)


def test_reused_gradient_buffers_never_overwrite_held_grads():
    """The fused path reuses freed gradient buffers; grads still referenced (kept by a user,
    or accumulated over two backward passes) must stay intact."""
    if fused_cpu.library() is None or not fused_cpu.pool.enabled:
        pytest.skip("fused CPU kernels or buffer reuse unavailable")
    cfg = PEERConfig(num_experts=1024, heads=2, topk=4, d_key=8, query_batchnorm=False)
    layer = PEER(16, cfg, table_device="cpu").double()
    x1, x2 = torch.randn(30, 16, dtype=torch.float64), torch.randn(30, 16, dtype=torch.float64)
    old_min = fused_cpu.pool.min_bytes
    fused_cpu.pool.min_bytes = 0  # pool even these small buffers
    try:
        grads = []
        for x in (x1, x2):  # separate grads, each kept alive
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()
            grads.append((layer.experts.u.grad, layer.experts.u.grad.to_dense().clone()))
        for held, copy in grads:
            torch.testing.assert_close(held.to_dense(), copy)
        layer.zero_grad(set_to_none=True)
        layer(x1).sum().backward()
        layer(x2).sum().backward()  # accumulates into the held first grad
        first = grads[0][1]
        torch.testing.assert_close(layer.experts.u.grad.to_dense(), first + grads[1][1])
        grads.clear()
        for _ in range(2):  # now free: later backward passes reuse the buffers
            layer.zero_grad(set_to_none=True)
            layer(x1).sum().backward()
            torch.testing.assert_close(layer.experts.u.grad.to_dense(), first)
    finally:
        fused_cpu.pool.min_bytes = old_min


def _init_rows_reference(seed: int, start: int, stop: int, dim: int, std: float) -> torch.Tensor:
    """Row r from block r // B's generator: the whole block drawn, then sliced."""
    from peer_dist.model.peer import INIT_BLOCK_ROWS as B
    blocks = []
    for block in range(start // B, (stop - 1) // B + 1):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63 - 1))
        blocks.append(torch.randn(B, dim, generator=gen).mul_(std))
    return torch.cat(blocks)[start - (start // B) * B:][:stop - start]


@pytest.mark.parametrize("start,stop", [(0, 40000), (5, 16384), (16384, 32768), (100, 101),
                                        (16000, 50000)])
def test_init_rows_depend_only_on_seed_and_row(start, stop):
    from peer_dist.model.peer import init_rows
    got = init_rows(7, start, stop, 4, 0.5)
    torch.testing.assert_close(got, _init_rows_reference(7, start, stop, 4, 0.5), rtol=0, atol=0)
    whole = init_rows(7, 0, 50000, 4, 0.5)
    torch.testing.assert_close(got, whole[start:stop], rtol=0, atol=0)


def test_bf16_activations_mix_in_table_precision():
    """bf16 activations (as under DeepSpeed bf16) with fp32 tables: same result as fp32 input
    rounded to bf16, and gradients flow back in bf16."""
    torch.manual_seed(3)
    cfg = PEERConfig(num_experts=256, heads=2, topk=4, d_key=8)
    layer = PEER(16, cfg, seed=1, table_device="cpu")
    x = torch.randn(10, 16).to(torch.bfloat16).requires_grad_()
    router_ids, router_gates = layer.router(x.float())
    y = layer.experts(x, router_ids, router_gates.to(torch.bfloat16))
    ref = layer.experts(x.detach().float(), router_ids, router_gates.to(torch.bfloat16).float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert layer.experts.u.grad.dtype == torch.float32


def test_bf16_tables_are_the_fp32_tables_rounded():
    """model.peer.table_dtype=bf16: the same draws, rounded once; the mix runs and its table
    gradients are bf16 and row-sparse."""
    cfg = PEERConfig(num_experts=256, heads=2, topk=4, d_key=8, table_dtype="bf16")
    layer = PEER(16, cfg, seed=1, table_device="cpu")
    ref = PEER(16, PEERConfig(num_experts=256, heads=2, topk=4, d_key=8), seed=1,
               table_device="cpu")
    assert layer.experts.u.dtype == torch.bfloat16
    assert torch.equal(layer.experts.u, ref.experts.u.detach().to(torch.bfloat16))
    assert torch.equal(layer.experts.v, ref.experts.v.detach().to(torch.bfloat16))
    x = torch.randn(5, 16)
    layer.router.load_state_dict(ref.router.state_dict())
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref(x), atol=3e-2, rtol=3e-2)
    y.sum().backward()
    assert layer.experts.u.grad.dtype == torch.bfloat16 and layer.experts.u.grad.is_sparse
    with pytest.raises(ValueError, match=r"model.peer.table_dtype='fp16' is invalid: allowed is "
                                         r"one of \['fp32', 'bf16'\]"):
        PEERConfig(table_dtype="fp16").validate()


@pytest.mark.parametrize("chunk", [None, 2 * 33 * 3])  # whole, or chunks of 3 tokens
def test_key_scores_gradients_in_token_chunks(chunk, monkeypatch):
    """The sub-key gradient off the C path (CUDA) is built over token chunks: the same as
    autograd through gathered keys, whatever the chunk."""
    if chunk:
        monkeypatch.setattr(kernels, "SCORE_CHUNK", chunk)
    torch.manual_seed(8)
    c, t, k, n, qh = 2, 10, 4, 33, 6
    q = torch.randn(c, t, qh, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(c, n, qh, dtype=torch.float64, requires_grad=True)
    sel = torch.randint(0, n, (c, t, k))
    grad = torch.randn(c, t, k, dtype=torch.float64)
    with kernel_path("torch"):
        got = torch.autograd.grad((kernels.key_scores(q, sel, keys) * grad).sum(), [q, keys])
    gathered = torch.stack([keys[i][sel[i]] for i in range(c)])  # (C, T, K, Qh)
    ref = (gathered * q[:, :, None, :]).sum(-1)
    want = torch.autograd.grad((ref * grad).sum(), [q, keys])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("synced", [False, True])
def test_query_batchnorm_with_bf16_parameters_and_fp32_statistics(x_dtype, synced):
    """train.dtype=bf16: DeepSpeed keeps the BatchNorm's parameters in bf16 and its running
    statistics in fp32. Training died in backward (a statistic autograd had saved was updated
    in place) and the 2-rank evaluation on mixed dtypes; now both match fp32 within bf16's
    rounding, and the statistics move as fp32's do."""
    from peer_dist.parallel.batchnorm import SyncBatchNorm1d

    torch.manual_seed(5)
    cfg = PEERConfig(num_experts=256, heads=2, topk=4, d_key=8)
    ref = PEER(16, cfg, seed=1, table_device="cpu").router
    low = PEER(16, cfg, seed=1, table_device="cpu").router
    low.load_state_dict(ref.state_dict())
    low.norm.weight.data = low.norm.weight.data.bfloat16()
    low.norm.bias.data = low.norm.bias.data.bfloat16()
    if synced:  # its eval path (training needs a process group: tests/distributed)
        ref.norm, low.norm = SyncBatchNorm1d(ref.norm), SyncBatchNorm1d(low.norm)
    assert low.norm.running_mean.dtype == torch.float32
    x = torch.randn(40, 16)
    for train in ([False] if synced else [True, False]):
        ref.train(train), low.train(train)
        xs = x.to(x_dtype).requires_grad_()
        ids, gates = low(xs)
        want_ids, want_gates = ref(x)
        assert (ids == want_ids).float().mean() > 0.9  # bf16 rounding may swap a close pair
        torch.testing.assert_close(gates.float().sum(), want_gates.sum(), rtol=1e-2, atol=1e-2)
        if train:
            gates.float().pow(2).sum().backward()
            assert xs.grad is not None and torch.isfinite(xs.grad.float()).all()
    torch.testing.assert_close(low.norm.running_mean, ref.norm.running_mean, rtol=2e-2,
                               atol=2e-2)
    assert low.norm.running_mean.dtype == torch.float32
