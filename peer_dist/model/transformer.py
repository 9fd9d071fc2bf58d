"""Decoder-only LM: pre-norm blocks, causal attention with rotary positions, and per block a
dense FFW or a PEER layer (the paper puts PEER in the middle block only).

Shape legend: B = batch, L = sequence, D = dim, A = attention heads, E = head dim = D / A.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peer_dist.config import ModelConfig
from peer_dist.model.baselines import PKM, MoE
from peer_dist.model.peer import PEER


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (L, E/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, A, L, E), rotate pairs (x[2i], x[2i+1])."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, A, L, E)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, l, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def sparse_layer(cfg: ModelConfig, seed: int) -> nn.Module:
    """The layer of the blocks model.peer_blocks names: PEER, or a baseline (model.sparse_kind)."""
    if cfg.sparse_kind == "moe":
        return MoE(cfg.dim, cfg.ffw_mult * cfg.dim, cfg.moe)
    if cfg.sparse_kind == "pkm":
        return PKM(cfg.dim, cfg.peer, seed=seed)
    return PEER(cfg.dim, cfg.peer, seed=seed)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_peer: bool, seed: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffw_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffw = sparse_layer(cfg, seed) if use_peer else \
            FeedForward(cfg.dim, cfg.ffw_mult * cfg.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffw(self.ffw_norm(x))


class Transformer(nn.Module):
    """tokens (B, L) int64 -> logits (B, L, vocab). Expert tables start on the meta device:
    call `materialize_experts()` for a single-process model, or parallelize() to shard them."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        peer_ids = set(cfg.peer_block_ids())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(
            Block(cfg, i in peer_ids, seed=seed * 1000 + i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def peer_layers(self) -> list[PEER]:
        return [m for m in self.modules() if isinstance(m, PEER)]

    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' load-balancing losses of the last forward (0 without MoE layers)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE)]
        return sum(losses, torch.zeros(())) if losses else torch.zeros(())

    def materialize_experts(self, device: torch.device | str = "cpu") -> Transformer:
        for layer in self.peer_layers():
            layer.experts.materialize(device)
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        l = tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self.rope_cos[:l], self.rope_sin[:l]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits (B, L, V), targets (B, L)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_model(cfg: ModelConfig, seed: int, materialize: bool = True) -> Transformer:
    """Dense parameters drawn under `seed` (identical on every rank); tables materialised unless
    they are about to be sharded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(cfg, seed=seed)
    return model.materialize_experts() if materialize else model
