"""The PEER expert mix and the selected sub-key scores as autograd functions, built from the
row primitives (ops/rows.py) and, on CPU, the fused C kernels (ops/cpu.py); never a
(tokens, selections, dim) tensor.

Shape legend: T = tokens, S = selections per token (heads * topk), D = model dim,
N = rows of the expert tables, R = unique rows selected in a batch.

    y[t] = sum_s  g[t, s] * act(U[ids[t, s]] . x[t]) * V[ids[t, s]]

Forward and backward are three primitives: gather_dot (the u.x side), bag_sum (the v side, and
dx) and RowGroups.sums (the row-sparse table gradients: R rows, never a dense N x D tensor
unless asked for).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peer_dist.ops import cpu
from peer_dist.ops.rows import RowGroups, bag_sum, check_ids, gather_dot, row_grad

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation(name: str, s: torch.Tensor) -> torch.Tensor:
    return F.gelu(s) if name == "gelu" else F.relu(s)


def activation_grad(name: str, s: torch.Tensor) -> torch.Tensor:
    if name == "gelu":  # d/ds [s * Phi(s)] = Phi(s) + s * phi(s), exact (erf) GELU
        return 0.5 * (1.0 + torch.erf(s * _SQRT_HALF)) + s * torch.exp(-0.5 * s * s) * _INV_SQRT_2PI
    return (s > 0).to(s.dtype)


def _fused_ok(x, ids, gates, u, v) -> bool:
    """The fused CPU kernels take contiguous CPU fp32/fp64 tables of one dtype."""
    return (u.is_contiguous() and v.is_contiguous() and u.dtype == v.dtype == x.dtype
            and ids.dtype == torch.int64 and ids.numel() > 0
            and cpu.usable(x, gates, u, v))


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
            ctx.groups = RowGroups.of_tokens(ids, u.shape[0])  # checks ids against N
            y, s = cpu.rows_forward(ctx.groups, x, ids, gates, u, v, act == "gelu")
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
            dx, dgates, du, dv = cpu.rows_backward(groups, x, dy, ids, gates, s, u, v,
                                                   ctx.act == "gelu")
            if not tables:
                return dx, None, dgates, None, None, None, None
            return (dx, None, dgates, row_grad(groups.rows, du, n, ctx.sparse_grad),
                    row_grad(groups.rows, dv, n, ctx.sparse_grad), None, None)
        a = activation(ctx.act, s)
        dw = gather_dot(dy, ids, v)  # (T, S) dL/dw = dy . v
        dgates = dw * a
        ds = dw * gates * activation_grad(ctx.act, s)  # (T, S) dL/ds
        dx = bag_sum(ids, u, ds)
        du = dv = None
        if tables:
            groups = RowGroups.of_tokens(ids, u.shape[0])
            du = row_grad(groups.rows, groups.sums(x, ds), u.shape[0], ctx.sparse_grad)
            dv = row_grad(groups.rows, groups.sums(dy, gates * a), v.shape[0], ctx.sparse_grad)
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
        if ctx.needs_input_grad[2] and cpu.usable(q, grad):
            dkeys = cpu.key_grad(sel.contiguous(), grad, q.contiguous(), keys.shape[1])
        elif ctx.needs_input_grad[2]:  # (C, n, T) scatter of the K grads, then one product
            dense = grad.new_zeros(c, t, keys.shape[1]).scatter_add_(2, sel, grad)
            dkeys = torch.bmm(dense.transpose(1, 2), q)
        return dq, None, dkeys


def key_scores(q: torch.Tensor, sel: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(C, T, K): keys[c, sel[c, t, j]] . q[c, t] with gradients for q and keys."""
    return KeyScores.apply(q, sel, keys)
