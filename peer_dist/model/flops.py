"""FLOPs per token of a model, forward and backward, to match runs on compute.

Counted as what each layer computes (a multiply-add = 2 FLOPs), per token, forward:
  attention     q, k, v and output projections 8 D^2; scores and weighted values over the
                causal context, on average (L + 1) / 2 positions: 4 D (L + 1) / 2
  dense FFW     4 m D^2 (up and down projections, m = ffw_mult)
  PEER          query 2 D H Q; sub-key scores 2 H n Q (both halves: 2H sets of n keys of Q/2);
                the mix: per selection u.x and g a v, 4 D S (S = H K)
  PKM           query 2 D H Q; sub-key scores 2 H n Q; the value sum 2 D S
  MoE           router 2 D E; K experts of the dense FFW's shape 4 K m D^2 (expert choice
                processes capacity_factor * K token-expert pairs per token on average)
  head          2 D V
Backward is twice the forward (each product's two gradient products), so a training token
costs 3x its forward. Top-k selection, softmax, norms and activations are not counted.
Shape legend: D = dim, L = sequence length, H = heads, Q = d_key, n = sqrt(N), K = top-k,
E = MoE experts, V = vocabulary.
"""

from __future__ import annotations

import math

from peer_dist.config import ModelConfig


def _sparse_forward(cfg: ModelConfig) -> float:
    d, p, e = cfg.dim, cfg.peer, cfg.moe
    n, s = math.isqrt(p.num_experts), p.heads * p.topk
    keys = 2 * d * p.heads * p.d_key + 2 * p.heads * n * p.d_key
    if cfg.sparse_kind == "peer":
        return keys + 4 * d * s
    if cfg.sparse_kind == "pkm":
        return keys + 2 * d * s
    pairs = e.topk * (e.capacity_factor if e.routing == "expert" else 1.0)
    return 2 * d * e.experts + pairs * 4 * cfg.ffw_mult * d * d


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    d = cfg.dim
    sparse = set(cfg.peer_block_ids())
    attention = 8 * d * d + 4 * d * (seq_len + 1) / 2
    dense_ffw = 4 * cfg.ffw_mult * d * d
    blocks = sum(attention + (_sparse_forward(cfg) if i in sparse else dense_ffw)
                 for i in range(cfg.n_layers))
    return blocks + 2 * d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of one training token."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters a token uses), embeddings included."""
    d, p, e = cfg.dim, cfg.peer, cfg.moe
    n, s = math.isqrt(p.num_experts), p.heads * p.topk
    key_sets = 1 if p.shared_keys else p.heads
    router = d * p.heads * p.d_key + (2 * p.heads * p.d_key if p.query_batchnorm else 0) \
        + key_sets * 2 * n * (p.d_key // 2)
    ffw = 2 * cfg.ffw_mult * d * d
    common = 2 * cfg.vocab_size * d + d + cfg.n_layers * (2 * d + 4 * d * d)
    if cfg.sparse_kind == "peer":
        layer, active = router + 2 * p.num_experts * d, router + 2 * s * d
    elif cfg.sparse_kind == "pkm":
        layer, active = router + p.num_experts * d, router + s * d
    else:
        layer, active = d * e.experts + e.experts * ffw, d * e.experts + e.topk * ffw
    k = len(cfg.peer_block_ids())
    dense_blocks = cfg.n_layers - k
    return (common + dense_blocks * ffw + k * layer, common + dense_blocks * ffw + k * active)
