"""The PEER expert mix and the selected sub-key scores as autograd functions, built from the
row primitives (ops/rows.py) and, on CPU, the fused C kernels (ops/cpu.py); never a
(tokens, selections, dim) tensor.

Shape legend: T = tokens, S = selections per token (heads * topk), D = model dim,
N = rows of the expert tables, R = unique rows selected in a batch.

    y[t] = sum_s  g[t, s] * act(U[ids[t, s]] . x[t]) * V[ids[t, s]]

Forward and backward are three primitives: ragged_dot (the u.x side), ragged_bag_sum (the
v side, and dx) and RowGroups.sums (the row-sparse table gradients: R rows, never a dense N x D
tensor unless asked for), or on CPU the two fused kernels that do all of it in one pass over the
unique rows each. One autograd function (RaggedMix) serves the single-device layer (a bag per
token) and dispatch's owners (a bag per (token, owner) pair).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peer_dist.ops import cpu, triton_mix
from peer_dist.ops.rows import (
    RowGroups,
    bag_sum,
    check_ids,
    gather_dot,
    ragged_bag_sum,
    ragged_dot,
    row_grad,
)

# Scores held at once by product-key selection and the sub-key gradient off the C path (CUDA):
# 2^25 values (128 MiB in fp32) instead of a whole (2H, T, n) tensor, which is 2 GiB at h = 8,
# n = 1024 and 32,768 tokens. Read at call time, so a test can make it small.
SCORE_CHUNK = 1 << 25

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation(name: str, s: torch.Tensor) -> torch.Tensor:
    return F.gelu(s) if name == "gelu" else F.relu(s)


def activation_grad(name: str, s: torch.Tensor) -> torch.Tensor:
    if name == "gelu":  # d/ds [s * Phi(s)] = Phi(s) + s * phi(s), exact (erf) GELU
        return 0.5 * (1.0 + torch.erf(s * _SQRT_HALF)) + s * torch.exp(-0.5 * s * s) * _INV_SQRT_2PI
    return (s > 0).to(s.dtype)


def _fused_ok(x, rows, gates, u, v) -> bool:
    """The fused CPU kernels take contiguous CPU fp32/fp64 tables of one dtype."""
    return (u.is_contiguous() and v.is_contiguous() and u.dtype == v.dtype == x.dtype
            and rows.dtype == torch.int64 and rows.numel() > 0
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


def _bag_offsets(bag: torch.Tensor, bags: int) -> torch.Tensor:
    """(P+1,) CSR offsets: bag p's run in a nondecreasing bag (Q,) is [off[p], off[p+1])."""
    counts = torch.bincount(bag, minlength=bags)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def mix_dtype(x: torch.Tensor, u: torch.Tensor) -> torch.dtype:
    """The dtype the mix takes x in: its own where the Triton kernels run (they load any float
    dtype and sum in fp32), else the tables' (the C and PyTorch kernels take one dtype)."""
    return x.dtype if x.dtype == u.dtype or triton_mix.takes(x, u) else u.dtype


def _path(x, rows, gates, u, v) -> str:
    if _fused_ok(x, rows, gates, u, v):
        return "c"
    return "triton" if triton_mix.takes(x, u, v) else "torch"


class RaggedMix(torch.autograd.Function):
    """y[p] = sum over the selections q of bag p of g[q] * act(U[rows[q]] . x[p]) * V[rows[q]].

    x (P, D), rows (Q,) int64 table rows, bag (Q,) nondecreasing in [0, P), gates (Q,).
    U, V gradients row-sparse (or dense), times table_scale (a sharded layer's 1/W, folded into
    the per-selection weights: the gradients of x and the gates are not scaled). The
    single-device layer is the case bag = the token of each of its T*S selections; dispatch's
    owner mixes bags of any size (one per (token, owner) pair)."""

    @staticmethod
    def forward(ctx, x, rows, bag, gates, u, v, act: str, sparse_grad: bool,
                table_scale: float = 1.0):
        ctx.act, ctx.sparse_grad, ctx.table_scale = act, sparse_grad, table_scale
        ctx.path = _path(x, rows, gates, u, v)
        x, gates = x.contiguous(), gates.to(x.dtype).contiguous()
        offsets = None
        if ctx.path == "c":
            ctx.groups = RowGroups(rows, bag, u.shape[0])  # checks ids against N
            y, s = cpu.rows_forward(ctx.groups, x, gates, u, v, act == "gelu")
        else:
            check_ids(rows, u.shape[0])  # torch indexing would wrap -1 to the last row
            offsets = _bag_offsets(bag, x.shape[0])
            if ctx.path == "triton":
                rows = rows.long().contiguous()
                y, s = triton_mix.forward(x, rows, offsets, gates, u, v,
                                          act == "gelu")
            else:
                s = ragged_dot(x, rows, bag, offsets[:-1], u)  # (Q,) pre-activations
                y = ragged_bag_sum(rows, offsets[:-1], v, gates * activation(act, s))  # (P, D)
        ctx.save_for_backward(x, rows, bag, offsets, gates, u, v, s)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rows, bag, offsets, gates, u, v, s = ctx.saved_tensors
        dy, n, c = dy.contiguous(), u.shape[0], ctx.table_scale
        tables = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        du = dv = None
        if ctx.path == "c":  # one pass over the unique rows: dx, dgates and both table gradients
            groups = ctx.groups
            dx, dgates, du, dv = cpu.rows_backward(groups, x, dy, gates, s, u, v,
                                                   ctx.act == "gelu", c)
        elif ctx.path == "triton":  # per bag: dx, dgates; per unique row: the tables' rows
            dx, dgates, ds, ga = triton_mix.backward_bags(dy, rows, offsets, gates, s, u, v,
                                                          ctx.act == "gelu")
            if tables:
                groups = RowGroups(rows, bag, n)
                if c != 1.0:
                    ds, ga = ds * c, ga * c
                du, dv = triton_mix.row_grads(groups, x, dy, ds, ga, u.dtype)
        else:
            a = activation(ctx.act, s)
            dw = ragged_dot(dy, rows, bag, offsets[:-1], v)  # (Q,) dL/dw = dy . v
            dgates = dw * a
            ds = dw * gates * activation_grad(ctx.act, s)  # (Q,) dL/ds
            dx = ragged_bag_sum(rows, offsets[:-1], u, ds)
            if tables:
                groups = RowGroups(rows, bag, n)
                du, dv = groups.sums(x, ds * c), groups.sums(dy, gates * a * c)
        if not tables:
            return dx, None, None, dgates, None, None, None, None, None
        return (dx, None, None, dgates, row_grad(groups.rows, du, n, ctx.sparse_grad),
                row_grad(groups.rows, dv, n, ctx.sparse_grad), None, None, None)


def ragged_mix(x: torch.Tensor, rows: torch.Tensor, bag: torch.Tensor, gates: torch.Tensor,
               u: torch.Tensor, v: torch.Tensor, act: str = "gelu",
               sparse_grad: bool = True, table_scale: float = 1.0) -> torch.Tensor:
    """x (P, D), rows (Q,) rows of u/v (N, D), bag (Q,) nondecreasing in [0, P), gates (Q,)
    -> y (P, D); the U, V gradients times table_scale. Bags are checked before any kernel
    writes y[bag]."""
    ok = (x.dim() == 2 and rows.dim() == bag.dim() == gates.dim() == 1
          and rows.shape == bag.shape == gates.shape and u.shape == v.shape and u.dim() == 2
          and u.shape[1] == x.shape[1] and not rows.is_floating_point())
    if not ok:
        raise ValueError(f"ragged_mix: x {tuple(x.shape)}, rows {tuple(rows.shape)}, bag "
                         f"{tuple(bag.shape)}, gates {tuple(gates.shape)}, u {tuple(u.shape)}, "
                         f"v {tuple(v.shape)}; allowed are x (P, D), rows, bag and gates (Q,), "
                         "u and v (N, D)")
    if bag.numel() and (int(bag[0]) < 0 or int(bag[-1]) >= x.shape[0]
                        or bool((bag[1:] < bag[:-1]).any())):
        raise IndexError(f"ragged_mix: bag must be nondecreasing in [0, {x.shape[0]})")
    return _in_mix_dtype(x, u, lambda x: RaggedMix.apply(x, rows, bag, gates, u, v, act,
                                                         sparse_grad, table_scale))


def _in_mix_dtype(x: torch.Tensor, u: torch.Tensor, fn) -> torch.Tensor:
    """fn(x) with x in the mix's dtype (mix_dtype), the result back in x's."""
    dtype = mix_dtype(x, u)
    return fn(x) if dtype == x.dtype else fn(x.to(dtype)).to(x.dtype)


def peer_mix(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, u: torch.Tensor,
             v: torch.Tensor, act: str = "gelu", sparse_grad: bool = True,
             table_scale: float = 1.0) -> torch.Tensor:
    """x (T, D), ids (T, S) int64 rows of u/v (N, D), gates (T, S) -> y (T, D); the U, V
    gradients times table_scale."""
    _check_shapes(x, ids, gates, u, v)
    t, s = ids.shape
    bag = torch.arange(t, device=ids.device).repeat_interleave(s)
    return _in_mix_dtype(x, u, lambda x: RaggedMix.apply(
        x, ids.reshape(-1), bag, gates.reshape(-1), u, v, act, sparse_grad, table_scale))


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
        qh = q.shape[-1]
        out = gather_dot(q.reshape(c * t, qh), flat, keys.reshape(c * n, qh))
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
        elif ctx.needs_input_grad[2]:  # per token chunk: scatter the K grads, one product
            n = keys.shape[1]
            dkeys = q.new_zeros(c, n, q.shape[-1])
            step = max(1, SCORE_CHUNK // (c * n))
            for a in range(0, t, step):
                dense = grad.new_zeros(c, min(step, t - a), n)
                dense.scatter_add_(2, sel[:, a:a + step], grad[:, a:a + step])
                dkeys.baddbmm_(dense.transpose(1, 2), q[:, a:a + step])
        return dq, None, dkeys


def key_scores(q: torch.Tensor, sel: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(C, T, K): keys[c, sel[c, t, j]] . q[c, t] with gradients for q and keys."""
    return KeyScores.apply(q, sel, keys)
