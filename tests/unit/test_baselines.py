"""The isoFLOP baselines (MoE token and expert choice, PKM) against brute-force versions, the
FLOP counter against hand counts, and parameter counts against the built models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peer_dist.config import ConfigError, ModelConfig, MoEConfig, PEERConfig
from peer_dist.model.baselines import PKM, MoE
from peer_dist.model.flops import forward_flops_per_token, param_counts, train_flops_per_token
from peer_dist.model.transformer import build_model


def _ffw(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ moe.up[e]) @ moe.down[e]


def test_moe_token_choice_matches_brute_force_and_balances():
    torch.manual_seed(0)
    moe = MoE(8, 16, MoEConfig(experts=4, topk=2, aux_weight=0.5)).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    y = moe(x)
    probs = F.softmax(moe.router(x), -1)
    want = torch.zeros_like(x)
    for t in range(10):
        top = probs[t].topk(2)
        g = top.values / top.values.sum()
        for j, e in enumerate(top.indices.tolist()):
            want[t] += g[j] * _ffw(moe, e, x[t:t + 1])[0]
    torch.testing.assert_close(y, want)
    counts = torch.zeros(4, dtype=torch.float64)
    for e in probs.topk(2, -1).indices.reshape(-1).tolist():
        counts[e] += 1
    aux = 0.5 * 4 * ((counts / 20) * probs.mean(0)).sum()
    torch.testing.assert_close(moe.aux_loss.double(), aux)
    y.sum().backward()
    assert moe.up.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_moe_expert_choice_matches_brute_force():
    torch.manual_seed(1)
    moe = MoE(8, 16, MoEConfig(experts=4, topk=1, routing="expert")).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    y = moe(x)
    probs = F.softmax(moe.router(x), -1)  # each expert takes its top 12 * 1 / 4 = 3 tokens
    want = torch.zeros_like(x)
    for e in range(4):
        g, tok = probs[:, e].topk(3)
        for gi, t in zip(g, tok.tolist(), strict=True):
            want[t] += gi * _ffw(moe, e, x[t:t + 1])[0]
    torch.testing.assert_close(y, want)
    assert float(moe.aux_loss.detach()) == 0.0


def test_pkm_is_a_gated_sum_of_value_rows():
    torch.manual_seed(2)
    cfg = PEERConfig(num_experts=256, heads=2, topk=4, d_key=8)
    pkm = PKM(8, cfg).double().eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    ids, gates = pkm.router(x)
    want = (gates[..., None] * pkm.values[ids]).sum(1)
    torch.testing.assert_close(pkm(x), want)
    with pytest.raises(ConfigError, match="model.peer.topk"):
        PKM(8, PEERConfig(num_experts=256, heads=2, topk=17, d_key=8))


def test_moe_config_is_checked():
    with pytest.raises(ConfigError, match=r"model.moe.topk=5 .* 1 <= topk <= model.moe.experts"):
        MoE(8, 16, MoEConfig(experts=4, topk=5))
    with pytest.raises(ConfigError, match="model.moe.routing='random'"):
        MoE(8, 16, MoEConfig(routing="random"))


def _cfg(kind: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=16, dim=8, n_layers=2, n_heads=2, ffw_mult=2,
                       peer_blocks="1", sparse_kind=kind,
                       peer=PEERConfig(num_experts=64, heads=2, topk=4, d_key=4),
                       moe=MoEConfig(experts=4, topk=2), **kw)


def test_flops_against_hand_counts():
    """d = 8, L = 4, m = 2, V = 16; block 0 dense, block 1 the sparse layer.
    attention per block: 8*64 + 4*8*(4+1)/2 = 592; dense FFW: 4*2*64 = 512; head: 2*8*16 = 256.
    PEER (H = 2, Q = 4, n = 8, S = 8): query 2*8*2*4 = 128, scores 2*2*8*4 = 128, mix 4*8*8 =
    256 -> 512. PKM: 128 + 128 + 2*8*8 = 384. MoE (E = 4, K = 2): 2*8*4 + 2*512 = 1088."""
    base = 592 * 2 + 512 + 256
    for kind, sparse in (("peer", 512), ("pkm", 384), ("moe", 1088)):
        assert forward_flops_per_token(_cfg(kind), seq_len=4) == base + sparse
        assert train_flops_per_token(_cfg(kind), seq_len=4) == 3 * (base + sparse)
    dense = _cfg("peer", )
    dense.peer_blocks = "none"
    assert forward_flops_per_token(dense, 4) == 592 * 2 + 512 * 2 + 256


@pytest.mark.parametrize("kind", ["peer", "pkm", "moe"])
def test_param_counts_match_the_built_model(kind):
    cfg = _cfg(kind)
    total, active = param_counts(cfg)
    assert total == sum(p.numel() for p in build_model(cfg, 0).parameters())
    assert active < total
    s = cfg.peer.heads * cfg.peer.topk
    if kind == "peer":  # a token uses S rows of U and of V, not all N
        assert total - active == 2 * (cfg.peer.num_experts - s) * cfg.dim
    assert math.isfinite(active)
