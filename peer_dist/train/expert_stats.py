"""Expert usage and unevenness (the PEER paper's Table 2), measured on held-out tokens.

For N experts, z'_i = sum over tokens x of g_i(x), where g_i(x) sums the gates of expert i over
every head (and selection) that picked it for x, and is 0 when nothing picked it;
z = z' / ||z'||_1.

    usage      = #{i : z_i != 0} / N                      (1 = every expert was used)
    unevenness = log N + sum_i z_i log z_i = KL(z || uniform)   (0 = perfectly even; log N =
                                                                  all mass on one expert)

Shapes: T = tokens, S = selections per token (heads * topk), N = experts.
A data-parallel evaluation all-reduces `stats.counts` (SUM) before reading the figures.
"""

from __future__ import annotations

import math

import torch


def expert_usage(mass: torch.Tensor) -> float:
    """Fraction of experts with nonzero gate mass; mass is z' (N,) or z."""
    _check_mass(mass)
    return float((mass != 0).sum().item()) / mass.numel()


def expert_unevenness(mass: torch.Tensor) -> float:
    """KL(z || uniform) = log N + sum z log z with z = mass / sum(mass); 0 log 0 = 0."""
    _check_mass(mass)
    z = mass.to(torch.float64) / mass.sum(dtype=torch.float64)
    nz = z[z > 0]
    return math.log(mass.numel()) + float((nz * nz.log()).sum().item())


def expert_summary(mass: torch.Tensor) -> dict[str, float]:
    return {"usage": expert_usage(mass), "unevenness": expert_unevenness(mass)}


def _check_mass(mass: torch.Tensor) -> None:
    if mass.dim() != 1 or mass.numel() == 0:
        raise ValueError(f"gate mass must be a non-empty (N,) vector, got shape "
                         f"{tuple(mass.shape)}")
    if bool((mass < 0).any()):
        raise ValueError("gate mass must be >= 0 (gates are softmax outputs)")
    if not float(mass.sum().item()) > 0:
        raise ValueError("gate mass is all zero: record routing on some tokens first")


class ExpertStats:
    """Accumulates z' over batches for one PEER layer (N experts)."""

    def __init__(self, num_experts: int, device: torch.device | str = "cpu"):
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} is invalid: allowed is >= 1")
        self.num_experts = num_experts
        # float64: a 1M-expert table summed over millions of tokens keeps small masses exact.
        self.counts = torch.zeros(num_experts, dtype=torch.float64, device=device)  # z' (N,)
        self.tokens = 0

    def add(self, ids: torch.Tensor, gates: torch.Tensor) -> None:
        """ids (T, S) int64 expert ids in [0, N), gates (T, S) their gate values."""
        if ids.shape != gates.shape:
            raise ValueError(f"ids {tuple(ids.shape)} and gates {tuple(gates.shape)} must have "
                             "the same (T, S) shape")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
            raise ValueError(f"expert ids must lie in [0, {self.num_experts}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if self.counts.device != ids.device:
            self.counts = self.counts.to(ids.device)
        self.counts.index_add_(0, ids.reshape(-1), gates.reshape(-1).to(torch.float64))
        self.tokens += ids.shape[0] if ids.dim() > 1 else ids.numel()

    def reset(self) -> None:
        self.counts.zero_()
        self.tokens = 0

    def usage(self) -> float:
        return expert_usage(self.counts)

    def unevenness(self) -> float:
        return expert_unevenness(self.counts)

    def summary(self) -> dict[str, float]:
        return expert_summary(self.counts)
