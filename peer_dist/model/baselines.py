"""The baselines of the paper's isoFLOP comparison, drop-in FFW replacements:
x (..., D) -> (..., D).

    MoE   experts of the dense FFW's shape (D -> m D -> D) behind a linear router: token choice
          (each token takes its top-k experts, gates renormalised over them, Switch's
          load-balancing loss) or expert choice (each expert takes its top-C tokens,
          C = capacity_factor * T * k / E, gate = the router probability; a token no expert
          took passes through the residual only).
    PKM   product-key memory (Lample et al. 2019): PEER's router (query, BatchNorm, sub-keys,
          exact top-k, softmax per head) over one value table: y = sum_h sum_k g * V[id].

Both are ordinary dense modules: in the sharded trainer they are replicated and trained by
DeepSpeed like the attention (only PEER tables are sharded). Shape legend: T = tokens,
D = dim, E = experts, K = experts per token, H = heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peer_dist.config import MoEConfig, PEERConfig
from peer_dist.model.peer import ProductKeyRouter
from peer_dist.ops.rows import bag_sum


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.router = nn.Linear(dim, cfg.experts, bias=False)
        bound_up, bound_down = 1 / math.sqrt(dim), 1 / math.sqrt(hidden)  # nn.Linear's init
        self.up = nn.Parameter(torch.empty(cfg.experts, dim, hidden).uniform_(-bound_up, bound_up))
        self.down = nn.Parameter(
            torch.empty(cfg.experts, hidden, dim).uniform_(-bound_down, bound_down))
        self.aux_loss = torch.zeros(())  # the last forward's weighted load-balancing loss

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x @ self.up[e]) @ self.down[e]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        t, e, k = x.shape[0], self.cfg.experts, self.cfg.topk
        probs = F.softmax(self.router(x).float(), dim=-1)  # (T, E)
        y = torch.zeros_like(x)
        if t == 0:
            self.aux_loss = probs.sum() * 0.0
            return y.view(shape)
        if self.cfg.routing == "token":
            gate, idx = probs.topk(k, dim=-1)  # (T, K)
            gate = gate / gate.sum(-1, keepdim=True)
            for j in range(e):
                tok, slot = (idx == j).nonzero(as_tuple=True)
                if tok.numel():
                    out = self._expert(j, x[tok]) * gate[tok, slot, None].to(x.dtype)
                    y = y.index_add(0, tok, out)
            # Switch: E * sum_e (share of the T*K slots routed to e) * (mean probability of e)
            share = torch.bincount(idx.reshape(-1), minlength=e).float() / (t * k)
            self.aux_loss = self.cfg.aux_weight * e * (share * probs.mean(0)).sum()
        else:
            cap = min(t, max(1, int(self.cfg.capacity_factor * t * k / e)))
            gate, tok = probs.t().topk(cap, dim=-1)  # (E, C)
            for j in range(e):
                y = y.index_add(0, tok[j], self._expert(j, x[tok[j]]) * gate[j, :, None]
                                .to(x.dtype))
            self.aux_loss = probs.sum() * 0.0
        return y.view(shape)


class PKM(nn.Module):
    def __init__(self, dim: int, cfg: PEERConfig, seed: int = 0):
        super().__init__()
        self.router = ProductKeyRouter(dim, cfg)  # validates cfg
        g = torch.Generator().manual_seed(seed % (2**63 - 1))  # a block's seed is 1000 x the run's
        self.values = nn.Parameter(torch.randn(cfg.num_experts, dim, generator=g) / math.sqrt(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, gates = self.router(x)  # (T, H*K)
        return bag_sum(ids, self.values, gates.to(self.values.dtype)).to(x.dtype).view(shape)
