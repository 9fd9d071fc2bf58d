"""Steps whose loss or gradients are not finite: found alike on every rank, skipped whole.

One all-reduce per step carries every rank's loss sum and the squared norm of each PEER
layer's table gradients; the dense norm is the same on every rank already (DeepSpeed reduces
it). A NaN or inf anywhere shows in those sums, so every rank takes the same decision.

A skipped step changes nothing that persists: no parameter, no optimizer state (ours, and
DeepSpeed's: its step still runs for its own bookkeeping, with the torch optimizer inside made
a no-op), no BatchNorm running statistic (the forward already updated them: restored). The
step counter, the data position and the LR schedule move on, as for any step.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from peer_dist.errors import UserError

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


class NonFiniteError(UserError):
    """train.nonfinite=stop, or too many consecutive skips: the run cannot go on as it is."""

    def __init__(self, message: str):
        super().__init__(message, all_ranks=True)


def running_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the BatchNorm running statistics (small), to restore on a skipped step."""
    return {name: b.detach().clone() for name, b in model.named_buffers()
            if name.rsplit(".", 1)[-1] in RUNNING_STATS}


def restore_running_stats(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    for name, value in saved.items():
        buffers[name].copy_(value)


@contextmanager
def optimizer_step_skipped(optimizer: torch.optim.Optimizer):
    """Inside, optimizer.step() does nothing: DeepSpeed's engine.step() still runs around it
    (gradient zeroing, ZeRO partitions, counters), but no weight or Adam state moves. Under ZeRO
    and bf16 the engine copies its fp32 master weights back into the model: unchanged too."""
    optimizer.step = lambda *args, **kwargs: None  # instance attribute shadows the method
    try:
        yield
    finally:
        del optimizer.step


def first_nonfinite(loss_sum: float, dense_norm: float,
                    table_sq: dict[str, float], dense_where: str) -> str | None:
    """Where the first non-finite value of a step appeared, or None: the loss comes before
    every gradient (it makes them all non-finite), then the gradients, tables by layer."""
    if not math.isfinite(loss_sum):
        return "the loss"
    bad = [f"table gradient of {name}" for name, sq in table_sq.items() if not math.isfinite(sq)]
    if not math.isfinite(dense_norm):
        bad.insert(0, f"dense gradient ({dense_where})")
    return ", ".join(bad) or None


@dataclass
class SkipTracker:
    """Consecutive skips, the total, and where the current streak began."""

    policy: str  # skip | stop
    max_skipped: int
    total: int = 0
    streak: int = 0
    streak_start: tuple[int, str] | None = None  # (step, where)

    def record(self, step: int, where: str | None) -> bool:
        """Account for step (1-based); True if it is skipped. Raises NonFiniteError when the
        run must stop."""
        if where is None:
            self.streak, self.streak_start = 0, None
            return False
        self.total += 1
        self.streak += 1
        if self.streak_start is None:
            self.streak_start = (step, where)
        first_step, first_where = self.streak_start
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: non-finite value in {where}; stopped (train.nonfinite=stop). "
                "Allowed: a lower optim.lr or optim.table_lr, optim.grad_clip > 0, or "
                "train.nonfinite=skip to skip such steps")
        if self.streak >= self.max_skipped:
            raise NonFiniteError(
                f"step {step}: {self.streak} consecutive steps skipped for non-finite values "
                f"(train.max_skipped={self.max_skipped}); the first, step {first_step}, in "
                f"{first_where}. Allowed: a lower optim.lr or optim.table_lr, optim.grad_clip "
                "> 0, or a larger train.max_skipped")
        return True
