"""The PEER expert mix as one autograd function, without a (tokens, selections, dim) tensor.

Shape legend: T = tokens, S = selections per token (heads * topk), D = model dim,
N = rows of the expert tables, R = unique rows selected in a batch.

    y[t] = sum_s  g[t, s] * act(U[ids[t, s]] . x[t]) * V[ids[t, s]]

Forward and backward are built from three primitives:
  - gather_dot(x, ids, W):  (T, S) dots W[ids[t, s]] . x[t]            (the u.x side)
  - embedding_bag(ids, W, w): (T, D) weighted row sums                  (the v side, and dx)
  - row_sums(ids, X, w):    (R, D) per unique row, sum of w * X[t]      (table gradients)
The table gradients are row-sparse: R rows, never a dense N x D tensor unless asked for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peer_dist.model import fused_cpu

_MODE_SUM = 0
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# The kernel embedding_bag's backward uses for per-sample-weight gradients computes exactly
# W[ids[t, s]] . x[t] without materialising rows. It is private, so it sits behind a probe
# with a tested fallback (`use_private_gather_dot(False)` forces the fallback).
_PRIVATE_OK: bool | None = None


def use_private_gather_dot(enabled: bool | None) -> None:
    """Force (True/False) or re-probe (None) the private aten kernel for gather_dot."""
    global _PRIVATE_OK
    _PRIVATE_OK = enabled


def _private_available() -> bool:
    global _PRIVATE_OK
    if _PRIVATE_OK is None:
        try:
            x, w = torch.randn(2, 3), torch.randn(4, 3)
            ids = torch.tensor([[1, 3], [0, 2]])
            got = _gather_dot_private(x, ids, w)
            _PRIVATE_OK = bool(torch.allclose(got, _gather_dot_chunked(x, ids, w, 64)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _PRIVATE_OK = False
    return _PRIVATE_OK


def _gather_dot_private(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    t, s = ids.shape
    offsets = torch.arange(0, t * s, s, device=ids.device)
    offset2bag = torch.arange(t, device=ids.device).repeat_interleave(s)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x.contiguous(), w, ids.reshape(-1), offsets, offset2bag, _MODE_SUM, -1)
    return out.view(t, s)


def _gather_dot_chunked(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                        chunk_tokens: int) -> torch.Tensor:
    out = torch.empty(ids.shape, dtype=x.dtype, device=x.device)
    for a in range(0, ids.shape[0], chunk_tokens):
        rows = w[ids[a:a + chunk_tokens]]  # (t, S, D), bounded by chunk_tokens
        out[a:a + chunk_tokens] = torch.bmm(rows, x[a:a + chunk_tokens, :, None]).squeeze(-1)
    return out


def gather_dot(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
               chunk_tokens: int = 256) -> torch.Tensor:
    """(T, S): w[ids[t, s]] . x[t]. x (T, D), ids (T, S) int64, w (N, D)."""
    if ids.numel() == 0:
        return torch.zeros(ids.shape, dtype=x.dtype, device=x.device)
    if _private_available():
        check_ids(ids, w.shape[0])  # the private op reads rows unchecked
        return _gather_dot_private(x, ids, w)
    return _gather_dot_chunked(x, ids, w, chunk_tokens)


def check_ids(ids: torch.Tensor, n: int, what: str = "expert ids") -> None:
    """IndexError unless every id lies in [0, n): checked before a kernel reads a row."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise IndexError(f"{what} must lie in [0, {n}), got [{int(ids.min())}, "
                         f"{int(ids.max())}]")


def bag_sum(ids: torch.Tensor, w: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(T, D): sum_s weights[t, s] * w[ids[t, s]]."""
    if ids.shape[1] == 0:
        return torch.zeros(ids.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
    return F.embedding_bag(ids, w, per_sample_weights=weights.to(w.dtype), mode="sum")


class RowGroups:
    """Selections grouped by table row: the sort done once, reused by both table gradients."""

    def __init__(self, ids: torch.Tensor):
        t, s = ids.shape
        flat = ids.reshape(-1)
        self.rows, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
        self.order = torch.argsort(inverse, stable=True)  # selections sorted by row
        self.token = self.order // max(s, 1)  # token of each sorted selection
        self.offsets = torch.cumsum(counts, 0) - counts  # (R,) start of each row's bag

    def sums(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(R, D): for each unique row, sum over its selections of weights * x[token]."""
        if self.rows.numel() == 0:
            return x.new_zeros(0, x.shape[1])
        w = weights.reshape(-1)[self.order].to(x.dtype)
        return F.embedding_bag(self.token, x, self.offsets, per_sample_weights=w, mode="sum")


def activation(name: str, s: torch.Tensor) -> torch.Tensor:
    return F.gelu(s) if name == "gelu" else F.relu(s)


def activation_grad(name: str, s: torch.Tensor) -> torch.Tensor:
    if name == "gelu":  # d/ds [s * Phi(s)] = Phi(s) + s * phi(s), exact (erf) GELU
        return 0.5 * (1.0 + torch.erf(s * _SQRT_HALF)) + s * torch.exp(-0.5 * s * s) * _INV_SQRT_2PI
    return (s > 0).to(s.dtype)


def _rows_to_grad(rows: torch.Tensor, rows_grad: torch.Tensor, n: int,
                  sparse: bool) -> torch.Tensor:
    """Sorted unique rows (R,) and their gradients (R, D) -> sparse COO (or dense) (N, D)."""
    if sparse:
        return torch.sparse_coo_tensor(rows[None], rows_grad, (n, rows_grad.shape[1]),
                                       is_coalesced=True, check_invariants=False)
    dense = rows_grad.new_zeros(n, rows_grad.shape[1])
    return dense.index_copy_(0, rows, rows_grad)


def _table_grad(groups: RowGroups, rows_grad: torch.Tensor, n: int, sparse: bool) -> torch.Tensor:
    return _rows_to_grad(groups.rows, rows_grad, n, sparse)


def _fused_ok(x, ids, gates, u, v) -> bool:
    """The fused CPU kernels take contiguous CPU fp32/fp64 tables of one dtype."""
    return (u.is_contiguous() and v.is_contiguous() and u.dtype == v.dtype == x.dtype
            and ids.dtype == torch.int64 and ids.numel() > 0
            and fused_cpu.usable(x, gates, u, v))


def _check_shapes(x, ids, gates, u, v) -> None:
    """The shapes the kernels index by, checked before any of them runs."""
    ok = (x.dim() == 2 and ids.dim() == 2 and ids.shape[0] == x.shape[0]
          and gates.shape == ids.shape and u.shape == v.shape and u.dim() == 2
          and u.shape[1] == x.shape[1] and not ids.is_floating_point())
    if not ok:
        raise ValueError(f"peer_mix: x {tuple(x.shape)}, ids {tuple(ids.shape)} {ids.dtype}, "
                         f"gates {tuple(gates.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)}; "
                         "allowed are x (T, D), integer ids and gates (T, S), u and v (N, D)")


class PeerMix(torch.autograd.Function):
    """y = sum_s g * act(U[ids] . x) * V[ids]; U, V gradients row-sparse (or dense)."""

    @staticmethod
    def forward(ctx, x, ids, gates, u, v, act: str, sparse_grad: bool):
        ctx.act, ctx.sparse_grad = act, sparse_grad
        ctx.fused = _fused_ok(x, ids, gates, u, v)
        _check_shapes(x, ids, gates, u, v)
        if ctx.fused:
            x, ids, gates = x.contiguous(), ids.contiguous(), gates.to(x.dtype).contiguous()
            ctx.groups = fused_cpu.Groups(ids, u.shape[0])  # checks ids against N
            y, s = fused_cpu.rows_forward(ctx.groups, x, ids, gates, u, v, act == "gelu")
        else:
            check_ids(ids, u.shape[0])  # torch indexing would wrap -1 to the last row
            s = gather_dot(x, ids, u)  # (T, S) pre-activations
            y = bag_sum(ids, v, gates * activation(act, s))  # (T, D)
        ctx.save_for_backward(x, ids, gates, u, v, s)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, ids, gates, u, v, s = ctx.saved_tensors
        dy = dy.contiguous()
        tables = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        if ctx.fused:  # one pass over the unique rows: dx, dgates and both table gradients
            groups, n = ctx.groups, u.shape[0]
            dx, dgates, du, dv = fused_cpu.rows_backward(groups, x, dy, ids, gates, s, u, v,
                                                         ctx.act == "gelu")
            if not tables:
                return dx, None, dgates, None, None, None, None
            return (dx, None, dgates, _rows_to_grad(groups.rows, du, n, ctx.sparse_grad),
                    _rows_to_grad(groups.rows, dv, n, ctx.sparse_grad), None, None)
        a = activation(ctx.act, s)
        dw = gather_dot(dy, ids, v)  # (T, S) dL/dw = dy . v
        dgates = dw * a
        ds = dw * gates * activation_grad(ctx.act, s)  # (T, S) dL/ds
        dx = bag_sum(ids, u, ds)
        du = dv = None
        if tables:
            groups = RowGroups(ids)
            du = _table_grad(groups, groups.sums(x, ds), u.shape[0], ctx.sparse_grad)
            dv = _table_grad(groups, groups.sums(dy, gates * a), v.shape[0], ctx.sparse_grad)
        return dx, None, dgates, du, dv, None, None


def peer_mix(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, u: torch.Tensor,
             v: torch.Tensor, act: str = "gelu", sparse_grad: bool = True) -> torch.Tensor:
    """x (T, D), ids (T, S) int64 rows of u/v (N, D), gates (T, S) -> y (T, D)."""
    return PeerMix.apply(x, ids, gates, u, v, act, sparse_grad)


class KeyScores(torch.autograd.Function):
    """Scores of the selected sub-keys only: out[c, t, j] = keys[c, sel[c, t, j]] . q[c, t].

    q (C, T, Qh), sel (C, T, K) int64 in [0, n), keys (C, n, Qh) -> (C, T, K).
    The full (C, T, n) score matrix is only needed (without gradient) to find sel; the
    gradient of the selected scores is sparse in n, so dq is a K-row bag per (c, t) instead of
    a (T, n) x (n, Qh) product.
    """

    @staticmethod
    def forward(ctx, q, sel, keys):
        c, t, k = sel.shape
        n = keys.shape[1]
        flat = (sel + torch.arange(c, device=sel.device)[:, None, None] * n).view(c * t, k)
        ctx.save_for_backward(q, sel, keys, flat)
        out = gather_dot(q.reshape(c * t, -1), flat, keys.reshape(c * n, -1))
        return out.view(c, t, k)

    @staticmethod
    def backward(ctx, grad):
        q, sel, keys, flat = ctx.saved_tensors
        c, t, k = sel.shape
        grad = grad.contiguous()
        dq = dkeys = None
        if ctx.needs_input_grad[0]:
            dq = bag_sum(flat, keys.reshape(-1, keys.shape[-1]), grad.view(c * t, k))
            dq = dq.view_as(q)
        if ctx.needs_input_grad[2] and fused_cpu.usable(q, grad):
            dkeys = fused_cpu.key_grad(sel.contiguous(), grad, q.contiguous(), keys.shape[1])
        elif ctx.needs_input_grad[2]:  # (C, n, T) scatter of the K grads, then one product
            dense = grad.new_zeros(c, t, keys.shape[1]).scatter_add_(2, sel, grad)
            dkeys = torch.bmm(dense.transpose(1, 2), q)
        return dq, None, dkeys


def key_scores(q: torch.Tensor, sel: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(C, T, K): keys[c, sel[c, t, j]] . q[c, t] with gradients for q and keys."""
    return KeyScores.apply(q, sel, keys)
