"""Where an expert row lives: global id -> (owner, local row) in the block (torch.chunk) layout.

Optionally the ids first go through a fixed bijection pos = (a*e + c) mod N, gcd(a, N) = 1, so
that experts that are close in id (product keys make id = i*n + j, and a popular first sub-key i
makes a popular block) spread over owners. The map depends on N only, never on EP, so a
checkpoint of the permuted table reshards to any EP.
"""

from __future__ import annotations

import math

import torch

GOLDEN = 0.6180339887498949


def balancing_multiplier(n: int) -> int:
    """An a coprime with n near n / golden ratio (consecutive ids land far apart)."""
    if n <= 2:
        return 1
    a = max(1, int(n * GOLDEN)) | 1
    while math.gcd(a, n) != 1:
        a += 2
    return a % n or 1


class IdMap:
    """Global expert id <-> position in the (possibly permuted) table, and owner of a position."""

    def __init__(self, num_experts: int, ep: int, balance: bool = False, a: int | None = None,
                 c: int = 0):
        self.n, self.ep = num_experts, ep
        self.block = -(-num_experts // ep)  # b = ceil(N / EP)
        self.a = (a if a is not None else balancing_multiplier(num_experts)) if balance else 1
        self.c = c if balance else 0
        if math.gcd(self.a, num_experts) != 1:
            raise ValueError(f"id bijection multiplier a={self.a} shares a factor with "
                             f"num_experts={num_experts}: allowed are a with gcd(a, N) = 1")
        self.a_inv = pow(self.a, -1, num_experts) if num_experts > 1 else 1
        self.identity = self.a == 1 and self.c == 0

    def position(self, ids: torch.Tensor) -> torch.Tensor:
        """Expert ids -> table positions (int64)."""
        ids = ids.to(torch.int64)
        return ids if self.identity else (ids * self.a + self.c) % self.n

    def expert(self, pos: torch.Tensor) -> torch.Tensor:
        """Table positions -> expert ids (inverse of position)."""
        pos = pos.to(torch.int64)
        return pos if self.identity else ((pos - self.c) % self.n * self.a_inv) % self.n

    def split(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions -> (owner, local row)."""
        owner = torch.div(pos, self.block, rounding_mode="floor")
        return owner, pos - owner * self.block

    def rows_of(self, owner: int) -> tuple[int, int]:
        """[start, stop) positions held by an owner (possibly empty)."""
        start = min(owner * self.block, self.n)
        return start, min(start + self.block, self.n)
