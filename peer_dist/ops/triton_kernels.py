"""The Triton kernels of the expert mix (what each does: peer_dist/ops/triton_mix.py, which
imports this module on first use, so that processes that never run them never import triton).
"""

import triton
import triton.language as tl


@triton.jit
def _act(s, GELU: tl.constexpr):
    if GELU:  # exact (erf) GELU, as torch's default
        return 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
    return tl.where((s > 0) | (s != s), s, 0.0)  # ReLU keeps NaN, as torch's does


@triton.jit
def _dact(s, GELU: tl.constexpr):
    if GELU:
        return (0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
                + s * tl.exp(-0.5 * s * s) * 0.3989422804014327)
    return tl.where(s > 0, 1.0, 0.0)


@triton.jit
def _run(offs, D, BLOCK_D: tl.constexpr):
    """This program's run [start, end) of the CSR offsets, and the row's columns."""
    p = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    return p, tl.load(offs + p), tl.load(offs + p + 1), cols, cols < D


@triton.jit
def _tile(rows, q0, end, N, D, cols, cm, BLOCK_S: tl.constexpr):
    """Entries [q0, q0 + BLOCK_S) of the run ending at `end`: their positions q, which are
    in the run (qm), which also name a row in [0, N) (ok), the (BLOCK_S, BLOCK_D) mask and
    offsets of those rows."""
    q = q0 + tl.arange(0, BLOCK_S)
    qm = q < end
    r = tl.load(rows + q, mask=qm, other=0)
    ok = qm & (r >= 0) & (r < N)
    return q, qm, ok, ok[:, None] & cm[None, :], r[:, None] * D + cols[None, :]


@triton.jit
def mix_fwd(x, rows, offs, gates, u, v, y, pre, N, D, GELU: tl.constexpr,
             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    p, start, end, cols, cm = _run(offs, D, BLOCK_D)
    xr = tl.load(x + p * D + cols, mask=cm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for q0 in range(start, end, BLOCK_S):
        q, qm, ok, m2, off = _tile(rows, q0, end, N, D, cols, cm, BLOCK_S)
        s = tl.sum(tl.load(u + off, mask=m2, other=0.0).to(tl.float32) * xr[None, :], 1)
        tl.store(pre + q, s, mask=qm)
        g = tl.load(gates + q, mask=ok, other=0.0).to(tl.float32)
        w = tl.where(ok, g * _act(s, GELU), 0.0)
        acc += tl.sum(tl.load(v + off, mask=m2, other=0.0).to(tl.float32) * w[:, None], 0)
    tl.store(y + p * D + cols, acc.to(y.dtype.element_ty), mask=cm)


@triton.jit
def mix_bwd_bags(dy, rows, offs, gates, pre, u, v, dx, dg, ds, ga, N, D,
                  GELU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    p, start, end, cols, cm = _run(offs, D, BLOCK_D)
    dyr = tl.load(dy + p * D + cols, mask=cm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for q0 in range(start, end, BLOCK_S):
        q, qm, ok, m2, off = _tile(rows, q0, end, N, D, cols, cm, BLOCK_S)
        dw = tl.sum(tl.load(v + off, mask=m2, other=0.0).to(tl.float32) * dyr[None, :], 1)
        s = tl.load(pre + q, mask=qm, other=0.0)
        g = tl.load(gates + q, mask=qm, other=0.0).to(tl.float32)
        a = _act(s, GELU)
        dsq = tl.where(ok, dw * g * _dact(s, GELU), 0.0)
        tl.store(dg + q, (dw * a).to(dg.dtype.element_ty), mask=qm)
        tl.store(ds + q, dsq, mask=qm)
        tl.store(ga + q, g * a, mask=qm)
        acc += tl.sum(tl.load(u + off, mask=m2, other=0.0).to(tl.float32) * dsq[:, None], 0)
    tl.store(dx + p * D + cols, acc.to(dx.dtype.element_ty), mask=cm)


@triton.jit
def row_grads(x, dy, order, bag, roffs, ds, ga, du, dv, P, D,
               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    r, start, end, cols, cm = _run(roffs, D, BLOCK_D)
    acc_u = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_S):  # this row's selections, tokens as the "rows"
        k, km, ok, m2, off = _tile(bag, k0, end, P, D, cols, cm, BLOCK_S)
        i = tl.load(order + k, mask=km, other=0)
        dsk = tl.load(ds + i, mask=ok, other=0.0)
        gak = tl.load(ga + i, mask=ok, other=0.0)
        acc_u += tl.sum(tl.load(x + off, mask=m2, other=0.0).to(tl.float32) * dsk[:, None], 0)
        acc_v += tl.sum(tl.load(dy + off, mask=m2, other=0.0).to(tl.float32) * gak[:, None],
                        0)
    tl.store(du + r * D + cols, acc_u.to(du.dtype.element_ty), mask=cm)
    tl.store(dv + r * D + cols, acc_v.to(dv.dtype.element_ty), mask=cm)
