"""Product-key top-k == brute-force top-k over all N full keys [c_i; c'_j]."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from peer_dist.config import PEERConfig
from peer_dist.model.peer import ProductKeyRouter
from peer_dist.ops import cpu as fused_cpu
from peer_dist.ops import mix


def brute_force(router: ProductKeyRouter, x: torch.Tensor):
    """Score every one of the N = n*n full keys; return top-k ids and scores per head."""
    t, h, q = x.shape[0], router.heads, router.d_key
    n = router.n
    query = router.norm(router.query(x)).view(t, h, q)
    keys = router.sub_keys.expand(h, -1, -1, -1)  # (H, 2, n, Q/2)
    full = torch.cat([keys[:, 0, :, None, :].expand(h, n, n, q // 2),
                      keys[:, 1, None, :, :].expand(h, n, n, q // 2)], dim=-1)
    full = full.reshape(h, n * n, q)  # key i*n + j = [c_i; c'_j]
    scores = torch.einsum("thq,hnq->thn", query, full)  # (T, H, N)
    return scores.topk(router.topk, dim=-1)


@contextlib.contextmanager
def kernel_path(path: str):
    if path == "fused" and fused_cpu.library() is None:
        pytest.skip("no C compiler: fused CPU kernels unavailable")
    fused_cpu.use_fused_cpu(path == "fused")
    try:
        yield
    finally:
        fused_cpu.use_fused_cpu(None)


@pytest.mark.parametrize("n,heads,topk,d_key,shared,bn", [
    (8, 1, 1, 4, False, False),
    (16, 4, 8, 16, False, True),
    (32, 8, 16, 32, False, True),
    (32, 3, 32, 8, True, False),  # topk == n
    (20, 2, 7, 10, True, True),
    (64, 2, 4, 8, False, True),  # n >= 4k: the fused bounded selection
    (100, 3, 7, 6, False, False),  # groups of uneven size
])
@pytest.mark.parametrize("path", ["fused", "torch", "torch-chunked"])
@pytest.mark.parametrize("seed", [0, 1])
def test_product_key_topk_equals_brute_force(n, heads, topk, d_key, shared, bn, seed, path,
                                             monkeypatch):
    """torch-chunked: the PyTorch (CUDA) selection over chunks of 5 tokens (the last one 2)."""
    if path == "torch-chunked":
        monkeypatch.setattr(mix, "SCORE_CHUNK", 2 * heads * n * 5)
        path = "torch"
    torch.manual_seed(seed)
    cfg = PEERConfig(num_experts=n * n, heads=heads, topk=topk, d_key=d_key,
                     shared_keys=shared, query_batchnorm=bn)
    cfg.validate()
    router = ProductKeyRouter(24, cfg).double()
    x = torch.randn(37, 24, dtype=torch.float64)
    with torch.no_grad(), kernel_path(path):
        ids, gates = router(x)
    with torch.no_grad():
        want_scores, want_ids = brute_force(router, x)
    t = x.shape[0]
    assert ids.shape == gates.shape == (t, heads * topk)
    assert ids.dtype == torch.int64
    assert torch.equal(ids.view(t, heads, topk), want_ids)  # same experts, same order
    torch.testing.assert_close(gates.view(t, heads, topk), F.softmax(want_scores, dim=-1))
    assert int(ids.max()) < n * n and int(ids.min()) >= 0


def test_gates_sum_to_one_per_head():
    cfg = PEERConfig(num_experts=64 * 64, heads=4, topk=16, d_key=32)
    router = ProductKeyRouter(16, cfg)
    _, gates = router(torch.randn(50, 16))
    sums = gates.view(50, 4, 16).sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert math.isqrt(cfg.num_experts) == router.n


@pytest.mark.parametrize("n,k", [(512, 16), (1024, 16), (100, 7), (64, 16), (40, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_selection_matches_torch_topk(n, k, ties):
    """The fused per-row top-k (bounded by group maxima) against torch.topk, ties included:
    the selected values must agree exactly, and with ties any index holding that value."""
    if fused_cpu.library() is None:
        pytest.skip("no C compiler: fused CPU kernels unavailable")
    torch.manual_seed(n + k)
    h, t = 3, 50
    scores = torch.randn(2 * h, t, n)
    if ties:
        scores = scores.mul(2).round()  # few distinct values: many ties
    pairs = [(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
    pi, pj = torch.tensor(pairs).T.contiguous()
    sel1, sel2 = fused_cpu.pk_select(scores, pi, pj, k)
    s = scores.view(h, 2, t, n)
    got = s[:, 0].gather(-1, sel1) + s[:, 1].gather(-1, sel2)  # (H, T, K) selected scores
    full = (s[:, 0].topk(k, -1).values[..., :, None] + s[:, 1].topk(k, -1).values[..., None, :])
    want = full.flatten(-2).topk(k, -1).values
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if not ties:
        cand = (s[:, 0, :, :, None] + s[:, 1, :, None, :]).flatten(-2)  # all n*n pairs
        ids = cand.topk(k, -1).indices
        assert torch.equal(sel1 * n + sel2, ids)
