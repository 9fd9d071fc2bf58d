"""Row-sparse optimizer for expert tables (single-process tables or local shards).

Gradients arrive as sparse COO tensors holding only the touched rows (or dense, for checks).
  lazy_adam:  Adam moments updated on touched rows only (like torch.optim.SparseAdam); state 2x.
  adagrad:    row-wise Adagrad, one accumulator per row (mean of squared gradient); state N floats.
  dense_adam: exact Adam (all rows' moments decay every step), for parity with torch.optim.Adam.
  sgd:        plain SGD on touched rows.
"""

from __future__ import annotations

import torch

from peer_dist.model import fused_cpu

KINDS = ("lazy_adam", "adagrad", "dense_adam", "sgd")


def _rows_and_values(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(unique rows, (R, D) values) of a sparse grad, or (None, grad) for a dense one.

    Autograd drops the coalesced flag when it stores a sparse grad, so a grad whose rows are
    already strictly increasing (what the PEER kernel produces) is used as is: the O(R) check
    replaces coalesce()'s sort and copy.
    """
    if not grad.is_sparse:
        return None, grad
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()
    return grad._indices()[0], grad._values()


class RowSparseOptimizer(torch.optim.Optimizer):
    def __init__(self, params, kind: str = "lazy_adam", lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if kind not in KINDS:
            raise ValueError(f"table optimizer {kind!r} is invalid: allowed are {list(KINDS)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        self.kind = kind

    def init_state(self, p: torch.Tensor) -> dict:
        """Allocate a parameter's state up front (so memory is visible and checkpointable)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            if self.kind in ("lazy_adam", "dense_adam"):
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif self.kind == "adagrad":
                state["sum_sq"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.init_state(p)
                state["step"] += 1
                if p.grad is None:
                    if self.kind == "dense_adam":
                        self._adam(p, None, torch.zeros_like(p), group, state)
                    continue
                rows, g = _rows_and_values(p.grad)
                if self.kind == "dense_adam" and rows is not None:
                    g = torch.zeros_like(p).index_copy_(0, rows, g)
                    rows = None
                getattr(self, "_" + self.kind.replace("lazy_", "").replace("dense_", ""))(
                    p, rows, g, group, state)

    def _adam(self, p, rows, g, group, state):
        b1, b2 = group["betas"]
        t = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if rows is not None and _fused(p, g, m, v):  # in place, one pass over touched rows
            fused_cpu.adam_rows(p.data, m, v, rows.contiguous(), g.contiguous(), group["lr"],
                                b1, b2, group["eps"], 1 - b1 ** t, 1 - b2 ** t)
            return
        if rows is not None:  # lazy: only the touched rows' moments move
            m_r = m.index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
            v_r = v.index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
            m.index_copy_(0, rows, m_r)
            v.index_copy_(0, rows, v_r)
        else:
            m_r = m.mul_(b1).add_(g, alpha=1 - b1)
            v_r = v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = group["lr"] / (1 - b1 ** t)
        denom = v_r.div(1 - b2 ** t).sqrt_().add_(group["eps"])  # the one (R, D) temporary
        update = denom.reciprocal_().mul_(m_r).mul_(-step_size)
        if rows is None:
            p.add_(update)
        else:
            p.index_add_(0, rows, update)

    def _adagrad(self, p, rows, g, group, state):
        acc = state["sum_sq"]
        if rows is not None and _fused(p, g, acc):
            fused_cpu.adagrad_rows(p.data, acc, rows.contiguous(), g.contiguous(), group["lr"],
                                   group["eps"])
            return
        sq = g.pow(2).mean(dim=1)  # one accumulator per row
        if rows is None:
            acc.add_(sq)
            p.addcdiv_(g, acc.sqrt().add_(group["eps"])[:, None], value=-group["lr"])
        else:
            acc.index_add_(0, rows, sq)
            scale = acc[rows].sqrt().add_(group["eps"])[:, None]
            p.index_add_(0, rows, g / scale * (-group["lr"]))

    def _sgd(self, p, rows, g, group, state):
        if rows is None:
            p.add_(g, alpha=-group["lr"])
        else:
            p.index_add_(0, rows, g, alpha=-group["lr"])


def _fused(p: torch.Tensor, *others: torch.Tensor) -> bool:
    """Fused row updates need contiguous CPU tables and state of one float dtype."""
    return (p.is_contiguous() and all(t.is_contiguous() for t in others)
            and fused_cpu.usable(p, *others))


def grad_sq_norm(params) -> torch.Tensor:
    """Sum of squared gradient entries over params (sparse grads coalesced first)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            _, g = _rows_and_values(p.grad)
            total += g.double().pow(2).sum().cpu()
    return total


def scale_grads(params, factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.coalesce() * factor if p.grad.is_sparse else p.grad.mul_(factor)
