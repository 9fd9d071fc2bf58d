"""The layer at its edges: configs built directly, empty and one-token batches, and the router's
precision under bf16."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch

from peer_dist.config import ConfigError, PEERConfig
from peer_dist.errors import UserError
from peer_dist.model.peer import PEER, ProductKeyRouter
from peer_dist.ops import cpu

CFG = PEERConfig(num_experts=256, heads=2, topk=4, d_key=8)


@pytest.mark.parametrize("bad, key", [(dict(topk=17), "topk"), (dict(num_experts=200), "num"),
                                      (dict(d_key=7), "d_key"), (dict(router_dtype="fp8"),
                                                                 "router_dtype")])
def test_layer_built_directly_validates_its_config(bad: dict, key: str) -> None:
    cfg = PEERConfig(**{**CFG.__dict__, **bad})
    with pytest.raises(ConfigError, match=f"model.peer.{key}"):
        PEER(16, cfg)
    with pytest.raises(ConfigError, match=f"model.peer.{key}"):
        ProductKeyRouter(16, cfg)


def test_pk_select_refuses_topk_above_the_sub_keys() -> None:
    if cpu.library() is None:
        pytest.skip("no C compiler: fused CPU kernels unavailable")
    scores = torch.randn(2, 3, 4)  # n = 4 sub-keys
    pi = pj = torch.zeros(25, dtype=torch.long)
    with pytest.raises(ValueError, match=r"topk=5 with 4 sub-keys.*1 <= topk <= 4"):
        cpu.pk_select(scores, pi, pj, 5)
    # the kernel itself, called past the wrapper, writes valid ids instead of garbage
    sel = torch.full((2, 1, 3, 5), -7, dtype=torch.int64)
    cpu.library().pk_select_f32(0, 3, 3, 4, 5, 25, scores.data_ptr(), pi.data_ptr(),
                                pj.data_ptr(), ctypes.c_void_p(sel[0].data_ptr()),
                                ctypes.c_void_p(sel[1].data_ptr()))
    assert sel.min() == 0 and sel.max() == 0


@pytest.mark.parametrize("batchnorm", [True, False])
def test_empty_batch_trains_through_the_layer(batchnorm: bool) -> None:
    layer = PEER(16, PEERConfig(**{**CFG.__dict__, "query_batchnorm": batchnorm}),
                 table_device="cpu").train()
    x = torch.zeros(0, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert layer.router.query.weight.grad is not None
    assert float(layer.router.query.weight.grad.abs().sum()) == 0.0


def test_one_token_with_batchnorm_in_training_is_one_clear_error() -> None:
    layer = PEER(16, CFG, table_device="cpu").train()
    with pytest.raises(UserError, match=r"batch of 1 token.*parallel.bn_sync=global.*"
                                        r"query_batchnorm=false"):
        layer(torch.randn(1, 16))
    layer.eval()  # running statistics: one token is fine
    assert layer(torch.randn(1, 16)).shape == (1, 16)
    assert PEER(16, PEERConfig(**{**CFG.__dict__, "query_batchnorm": False}),
                table_device="cpu").train()(torch.randn(1, 16)).shape == (1, 16)


def _routing(layer: PEER, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.router(x)


def _router_grads_fp64(layer: PEER, x: torch.Tensor, ids: torch.Tensor,
                       upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """The router's parameter gradients for loss = sum(gates * upstream), in float64 from plain
    PyTorch ops (no fused kernel): query, training-mode BatchNorm, the selected sub-key scores
    (ids fixed: the selection has no gradient), softmax per head. x (T, D), ids (T, H*K)."""
    r = layer.router
    h, k, n, half = r.heads, r.topk, r.n, r.d_key // 2
    w = r.query.weight.detach().double().requires_grad_()
    gamma = r.norm.weight.detach().double().requires_grad_()
    beta = r.norm.bias.detach().double().requires_grad_()
    keys = r.sub_keys.detach().double().requires_grad_()  # (H, 2, n, Q/2)
    q = x @ w.T
    q = (q - q.mean(0)) / (q.var(0, unbiased=False) + r.norm.eps).sqrt() * gamma + beta
    q = q.view(-1, h, 2, half)  # (T, H, 2, Q/2)
    i, j = (ids // n).view(-1, h, k), (ids % n).view(-1, h, k)  # (T, H, K) each
    heads = torch.arange(h)[None, :, None]
    scores = ((keys[heads, 0, i] * q[:, :, None, 0]).sum(-1)
              + (keys[heads, 1, j] * q[:, :, None, 1]).sum(-1))  # (T, H, K)
    gates = torch.softmax(scores, dim=-1).reshape(-1, h * k)
    (gates * upstream).sum().backward()
    return {"query.weight": w.grad, "norm.weight": gamma.grad, "norm.bias": beta.grad,
            "sub_keys": keys.grad}


def test_router_runs_in_fp32_under_bf16() -> None:
    """bf16 parameters and activations: with router_dtype=fp32 the selection equals an fp32
    router holding the same (bf16-rounded) weights; with router_dtype=activations some of it
    differs. BatchNorm statistics still update; the bf16 weights' gradients (for a random
    upstream gradient) equal a float64 PyTorch computation of the same router within bf16
    rounding, and the fp32 router's within fp32 rounding."""
    torch.manual_seed(0)
    cfg = PEERConfig(num_experts=64 ** 2, heads=4, topk=8, d_key=32)
    base = PEER(64, cfg, table_device="cpu").train()
    low = copy.deepcopy(base).bfloat16()
    ref = copy.deepcopy(low).float()  # the same rounded weights, computed in fp32
    x = torch.randn(256, 64).bfloat16()
    ids_ref, gates_ref = _routing(ref, x.float())
    ids, gates = _routing(low, x)
    assert torch.equal(ids, ids_ref)
    assert gates.dtype == torch.float32
    torch.testing.assert_close(gates, gates_ref)
    assert not torch.equal(low.router.norm.running_mean, base.router.norm.running_mean)
    torch.testing.assert_close(low.router.norm.running_mean.float(),
                               ref.router.norm.running_mean, atol=1e-2, rtol=1e-2)
    # a random upstream gradient: gates.sum() has a zero true gradient (each head's softmax
    # sums to 1), so only a non-constant loss can tell a right router gradient from a wrong one
    upstream = torch.randn(gates.shape, generator=torch.Generator().manual_seed(1))
    (gates * upstream).sum().backward()
    (gates_ref * upstream).sum().backward()
    want = _router_grads_fp64(ref, x.double(), ids_ref, upstream.double())
    for name, w in want.items():
        got_ref = dict(ref.router.named_parameters())[name].grad
        got_low = dict(low.router.named_parameters())[name].grad
        assert got_low.dtype == torch.bfloat16, name
        scale = float(w.abs().max())
        assert scale > 1e-3, name  # a gradient far above rounding noise
        torch.testing.assert_close(got_ref.double(), w, atol=1e-5 * scale, rtol=1e-4)
        # bf16 storage of the same fp32 gradient: within its rounding (8 bits of mantissa)
        torch.testing.assert_close(got_low.double(), w, atol=1e-2 * scale, rtol=1e-2)
    bf16 = copy.deepcopy(low)
    bf16.router.router_dtype = "activations"
    ids_low, _ = _routing(bf16, x)
    assert (ids_low != ids_ref).float().mean() > 0.001  # bf16 scores pick other experts
