"""Product-key top-k == brute-force top-k over all N full keys [c_i; c'_j]."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peer_dist.config import PEERConfig
from peer_dist.model.peer import ProductKeyRouter


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


@pytest.mark.parametrize("n,heads,topk,d_key,shared,bn", [
    (8, 1, 1, 4, False, False),
    (16, 4, 8, 16, False, True),
    (32, 8, 16, 32, False, True),
    (32, 3, 32, 8, True, False),  # topk == n
    (20, 2, 7, 10, True, True),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_product_key_topk_equals_brute_force(n, heads, topk, d_key, shared, bn, seed):
    torch.manual_seed(seed)
    cfg = PEERConfig(num_experts=n * n, heads=heads, topk=topk, d_key=d_key,
                     shared_keys=shared, query_batchnorm=bn)
    cfg.validate()
    router = ProductKeyRouter(24, cfg).double()
    x = torch.randn(37, 24, dtype=torch.float64)
    with torch.no_grad():
        ids, gates = router(x)
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
