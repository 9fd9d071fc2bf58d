"""Row-sparse optimizer for expert tables (single-process tables or local shards).

Gradients arrive as sparse COO tensors holding only the touched rows (or dense, for checks).
  lazy_adam:  Adam moments updated on touched rows only (like torch.optim.SparseAdam); state 2x.
              Bias correction by the global step (as SparseAdam), or by each row's own count of
              updates (bias_correction="row": one int32 per row more). With the global step a
              row first touched at step t starts with a first update of
              (1-b1)/(1-b1^t) / sqrt((1-b2)/(1-b2^t)) x lr: 0.45x for betas (0.9, 0.95) and
              2.5x for (0.9, 0.999) once t is large; per row it is 1x, as for a fresh Adam.
  adagrad:    row-wise Adagrad, one accumulator per row (mean of squared gradient); state N floats.
  dense_adam: exact Adam (all rows' moments decay every step), for parity with torch.optim.Adam.
  sgd:        plain SGD on touched rows.

state_dtype=torch.bfloat16 stores exp_avg / exp_avg_sq (or sum_sq) in bf16, halving Adam's
state (4 instead of 8 bytes per table entry). The touched rows are upcast, updated in fp32 (fp64
for fp64 tables) and written back rounded to nearest, ties to even (no stochastic rounding);
bf16 tables (model.peer.table_dtype) are updated the same way: fp32 gradients and update,
rounded once into the table. A change below half a bf16 unit (2^-9 to 2^-8 of the value) is lost:
with beta2 = 0.999 a step moves exp_avg_sq by 0.001 * (g^2 - v), so it never decays and only
grows on spikes (g^2 > ~3v); beta2 <= 0.99 (the config default is 0.95) keeps it moving both
ways. A bf16 Adagrad accumulator stops growing once a step adds less than ~2^-9 of it; its
state is one value per row anyway, so bf16 saves little there.
"""

from __future__ import annotations

import torch

from peer_dist.config import BIAS_CORRECTIONS, TABLE_OPTIMIZERS, TABLE_STATE_DTYPES
from peer_dist.ops import cpu as fused_cpu
from peer_dist.ops import triton_optim
from peer_dist.ops.rows import coalesced

KINDS = TABLE_OPTIMIZERS
STATE_DTYPES = dict(zip(TABLE_STATE_DTYPES, (torch.float32, torch.bfloat16), strict=True))


def _rows_and_values(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(unique rows, (R, D) values) of a sparse grad, or (None, grad) for a dense one.

    Autograd drops the coalesced flag when it stores a sparse grad, so a grad whose rows are
    already strictly increasing (what the PEER kernel produces) is used as is: the O(R) check
    replaces coalesce()'s sort and copy.
    """
    if not grad.is_sparse:
        return None, grad
    rows = grad._indices()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= grad.shape[0]):
        # checked before coalesce() or a kernel touches a row (an index outside the table
        # aborts the process there)
        raise IndexError(f"sparse gradient rows must lie in [0, {grad.shape[0]}), got "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    grad = coalesced(grad)
    return grad._indices()[0], grad._values()


class RowSparseOptimizer(torch.optim.Optimizer):
    def __init__(self, params, kind: str = "lazy_adam", lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 state_dtype: torch.dtype | None = None, bias_correction: str = "global"):
        """state_dtype: dtype of the moments / accumulator; None = each table's own (fp32 for bf16).
        bias_correction (lazy_adam): "global" step or each "row"'s own update count."""
        if kind not in KINDS:
            raise ValueError(f"table optimizer {kind!r} is invalid: allowed are {list(KINDS)}")
        if bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(f"bias_correction={bias_correction!r} is invalid: allowed are "
                             f"{list(BIAS_CORRECTIONS)}")
        allowed = (None, torch.float32, torch.float64, torch.bfloat16)
        if state_dtype not in allowed:
            raise ValueError(f"state_dtype={state_dtype} is invalid: allowed are {allowed}")
        params = list(params)
        if not params:  # a model without PEER tables (a dense or baseline model): a no-op
            params = [{"params": []}]
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        self.kind = kind
        self.state_dtype = state_dtype
        self.per_row = kind == "lazy_adam" and bias_correction == "row"

    def init_state(self, p: torch.Tensor) -> dict:
        """Allocate a parameter's state up front (so memory is visible and checkpointable)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            dtype = self.state_dtype or _compute(p.dtype)
            if self.kind in ("lazy_adam", "dense_adam"):
                state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                if self.per_row:
                    state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int32,
                                                    device=p.device)
            elif self.kind == "adagrad":
                state["sum_sq"] = torch.zeros(p.shape[0], dtype=dtype, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.init_state(p)
                state["step"] += 1
                if p.grad is None:
                    if self.kind == "dense_adam":
                        self._adam(p, None, torch.zeros_like(p, dtype=_compute(p.dtype)), group,
                                   state)
                    continue
                rows, g = _rows_and_values(p.grad)
                g = g.to(_compute(g.dtype))
                if self.kind == "dense_adam" and rows is not None:
                    g = torch.zeros_like(p, dtype=g.dtype).index_copy_(0, rows, g)
                    rows = None
                getattr(self, "_" + self.kind.replace("lazy_", "").replace("dense_", ""))(
                    p, rows, g, group, state)

    def _adam(self, p, rows, g, group, state):
        b1, b2 = group["betas"]
        t = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        row_bc = None
        if self.per_row and rows is not None:  # each touched row's own update count
            counts = state["row_step"].index_add_(0, rows, torch.ones_like(rows, dtype=torch.int32))
            t_r = counts.index_select(0, rows).double()
            row_bc = torch.stack([1 - b1 ** t_r, 1 - b2 ** t_r], 1).contiguous()  # (R, 2)
        if rows is not None and triton_optim.takes(p.data, g, m, v):  # CUDA: fused, in place
            triton_optim.adam_rows(p.data, m, v, rows, g, group["lr"], b1, b2, group["eps"],
                                   1 - b1 ** t, 1 - b2 ** t, row_bc)
            return
        if rows is not None and _fused(p, g, m, v):  # in place, one pass over touched rows
            fused_cpu.adam_rows(p.data, m, v, rows.contiguous(), g.contiguous(), group["lr"],
                                b1, b2, group["eps"], 1 - b1 ** t, 1 - b2 ** t,
                                None if row_bc is None else row_bc.cpu())
            return
        # lazy (rows given): only the touched rows' moments move; dense: all of them
        m_r = _load(m, rows, g.dtype).mul_(b1).add_(g, alpha=1 - b1)
        v_r = _load(v, rows, g.dtype).mul_(b2).addcmul_(g, g, value=1 - b2)
        _store(m, rows, m_r)
        _store(v, rows, v_r)
        if row_bc is None:
            step_size, bc2 = group["lr"] / (1 - b1 ** t), 1 - b2 ** t
        else:  # (R, 1) columns, in the rows' dtype
            bc = row_bc.to(g.dtype)
            step_size, bc2 = group["lr"] / bc[:, :1], bc[:, 1:]
        denom = v_r.div(bc2).sqrt_().add_(group["eps"])  # the one (R, D) temporary
        _apply(p, rows, denom.reciprocal_().mul_(m_r).mul_(-step_size))

    def _adagrad(self, p, rows, g, group, state):
        acc = state["sum_sq"]
        if rows is not None and triton_optim.takes(p.data, g, acc):  # CUDA: fused, in place
            triton_optim.adagrad_rows(p.data, acc, rows, g, group["lr"], group["eps"])
            return
        if rows is not None and _fused(p, g, acc):
            fused_cpu.adagrad_rows(p.data, acc, rows.contiguous(), g.contiguous(), group["lr"],
                                   group["eps"])
            return
        a_r = _load(acc, rows, g.dtype).add_(g.pow(2).mean(dim=1))  # one accumulator per row
        _store(acc, rows, a_r)
        scale = a_r.sqrt().add_(group["eps"])[:, None]  # not in place: a_r may be acc
        _apply(p, rows, g / scale * (-group["lr"]))

    def _sgd(self, p, rows, g, group, state):
        _apply(p, rows, g, alpha=-group["lr"])


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype updates are computed in: fp32 for bf16/fp16 tables and gradients."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _apply(p: torch.Tensor, rows: torch.Tensor | None, update: torch.Tensor,
           alpha: float = 1.0) -> None:
    """p += alpha * update on the given rows (or all), summed in the update's dtype and rounded
    to p's (nearest, ties to even) where p is stored in less precision (bf16 tables)."""
    if rows is None:
        p.add_(update, alpha=alpha)
    elif update.dtype == p.dtype:
        p.index_add_(0, rows, update, alpha=alpha)
    else:
        kept = p.index_select(0, rows).to(update.dtype)
        p.index_copy_(0, rows, kept.add_(update, alpha=alpha).to(p.dtype))


def _load(t: torch.Tensor, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """State rows (or all of it) in the compute dtype: the state itself when that is its dtype
    and no rows are given (updated in place), else a copy."""
    return (t if rows is None else t.index_select(0, rows)).to(dtype)


def _store(t: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor) -> None:
    """Write updated rows back, rounded to the state's dtype (nearest, ties to even)."""
    if rows is not None:
        t.index_copy_(0, rows, values.to(t.dtype))
    elif values.data_ptr() != t.data_ptr():
        t.copy_(values)


def _fused(p: torch.Tensor, g: torch.Tensor, *state: torch.Tensor) -> bool:
    """Fused row updates need contiguous CPU tables and state of one float dtype, or fp32
    tables with bf16 state."""
    if not (p.is_contiguous() and all(t.is_contiguous() for t in state)):
        return False
    if state[0].dtype == torch.bfloat16:
        return fused_cpu.usable_bf16_state(p, g, *state)
    return fused_cpu.usable(p, g, *state)


def grad_sq_norm(params) -> torch.Tensor:
    """Sum of squared gradient entries over params (sparse grads coalesced first)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            _, g = _rows_and_values(p.grad)
            total += g.double().pow(2).sum().cpu()
    return total


def scale_grads(params, factor: float) -> None:
    """Every gradient times factor, in place (a sparse one's values: multiplying the sparse
    tensor would copy them, at ten times the cost)."""
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
            p.grad._values().mul_(factor)
        else:
            p.grad.mul_(factor)
