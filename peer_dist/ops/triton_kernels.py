"""The Triton kernels of the expert mix (what each does, and the launch parameters chosen by d:
peer_dist/ops/triton_mix.py, which imports this module on first use, so that processes that
never run them never import triton).

Layout, the reason for the 3-D tiles: a tile of W table rows is loaded as (C, W, CH), columns
c * CH + k of row w, CH = 32 lanes x VEC (VEC elements = one 128-bit load where the row's bytes
allow it). Triton lays the 32 lanes along CH and the warps along W, so each warp holds whole
rows: a row's dot with x is a shuffle reduction inside its warp (no barrier), and the weighted
sum over rows is kept per warp in a (C, W, CH) fp32 accumulator that is reduced across warps
once per bag (or per column part), not once per tile. Every U and V load of a tile is issued
before any reduction uses it. What still meets at a barrier once a tile: the per-selection
values stored to global memory (pre; ds, ga, dgates), which Triton moves from the warps'
layout to a store layout through shared memory, after the tile's loads are issued
(peer-bench kernels: loop_barriers, loads_after_barrier).

Wide rows (D > C * CH) are done in PARTS column parts: the dots first (a pass over U, or V in
the backward), the per-selection weights written to global memory, one barrier, then one pass
per column part for the sums. Every table row is still read once.

Table-row loads go through `_rows` only, as L2-only loads (.cg: a gathered row is rarely
read again by the same SM, so it does not take L1 from x and the ids); the compile check in
peer_dist/tools/bench_kernels.py finds them in the SASS by that modifier.
"""

import os

# Fused multiply-add where the compiler finds one: Triton's default until 3.9, which warns at
# every compile while the choice is left unset (the oracle's tolerances hold with it).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402 (after its setting)
import triton.language as tl  # noqa: E402


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
def _run(offs):
    """This program's run [start, end) of the CSR offsets."""
    p = tl.program_id(0).to(tl.int64)
    return p, tl.load(offs + p), tl.load(offs + p + 1)


@triton.jit
def _cols(c0, C: tl.constexpr, CH: tl.constexpr):
    """(C, 1, CH) column numbers c0 + c * CH + k."""
    return c0 + tl.arange(0, C)[:, None, None] * CH + tl.arange(0, CH)[None, None, :]


@triton.jit
def _colmask(cols, D, VEC: tl.constexpr):
    # cols < D, written per VEC-group so that the mask is visibly constant over each vector
    # (D is a multiple of VEC): the loads stay 128-bit where D is not a multiple of 16
    return (cols // VEC) < (D // VEC)


@triton.jit
def _rows(t, r, ok, D, c0, C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr):
    """(C, W, CH) fp32: columns [c0, c0 + C * CH) of rows r (W,) of t (rows of D values,
    D a multiple of VEC); zero where not ok (W,) or past D."""
    cols = _cols(c0, C, CH)
    base = tl.multiple_of(r * D, VEC)  # (W,) row starts, VEC-aligned: vector loads
    m = ok[None, :, None] & _colmask(cols, D, VEC)
    return tl.load(t + base[None, :, None] + cols, mask=m, other=0.0,
                   cache_modifier=".cg").to(tl.float32)


@triton.jit
def _row_per_warp(t, p, like, D, c0, C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr):
    """(C, W, CH) fp32: columns [c0, c0 + C * CH) of row p of t for each of the W rows of
    `like` (W,): a tile's layout (through L1, not counted as a table row)."""
    cols = _cols(c0, C, CH)
    base = tl.multiple_of(tl.zeros_like(like) + p * D, VEC)
    m = (like == like)[None, :, None] & _colmask(cols, D, VEC)
    return tl.load(t + base[None, :, None] + cols, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _vec(t, p, D, c0, C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr):
    """(C, 1, CH) fp32: columns [c0, c0 + C * CH) of row p of t."""
    cols = _cols(c0, C, CH)
    return tl.load(t + p * D + cols, mask=_colmask(cols, D, VEC), other=0.0).to(tl.float32)


@triton.jit
def _put(t, p, D, c0, val, C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr):
    """Row p of t, columns [c0, c0 + C * CH) <- val (C, CH) fp32, in t's dtype."""
    cols = tl.reshape(_cols(c0, C, CH), (C, CH))
    tl.store(t + p * D + cols, val.to(t.dtype.element_ty), mask=_colmask(cols, D, VEC))


@triton.jit
def _sel(rows, q0, end, N, W: tl.constexpr):
    """Selections [q0, q0 + W) of the run ending at `end`: positions q (W,), which are in the
    run (qm), which also name a row in [0, N) (ok), and their rows r (0 where not ok)."""
    q = q0 + tl.arange(0, W)
    qm = q < end
    r = tl.load(rows + q, mask=qm, other=0)
    ok = qm & (r >= 0) & (r < N)
    return q, qm, ok, tl.where(ok, r, 0)


@triton.jit
def _dots(t, r, ok, a, p, D, C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr,
          PARTS: tl.constexpr):
    """(W,) fp32: rows r of t dotted with row p of a, over all PARTS column parts."""
    part = tl.zeros([C, r.shape[0], CH], dtype=tl.float32)
    for k in range(PARTS):
        tile = _rows(t, r, ok, D, k * C * CH, C, CH, VEC)
        # row p's part loaded by every warp, in the tile's own layout: a (C, 1, CH) load
        # would be converted through shared memory, two barriers a part and tile (L1 hits)
        part += tile * _row_per_warp(a, p, r, D, k * C * CH, C, CH, VEC)
    return tl.sum(tl.sum(part, 2), 0)  # in-thread over C, then shuffles over CH


@triton.jit
def mix_fwd(x, rows, offs, gates, u, v, y, pre, N, D, GELU: tl.constexpr, W: tl.constexpr,
            C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr, PARTS: tl.constexpr,
            STAGES: tl.constexpr):
    p, start, end = _run(offs)
    if PARTS == 1:  # one pass: a tile's U and V rows loaded together
        xr = _vec(x, p, D, 0, C, CH, VEC)
        acc = tl.zeros([C, W, CH], dtype=tl.float32)
        for q0 in tl.range(start, end, W, num_stages=STAGES):
            q, qm, ok, r = _sel(rows, q0, end, N, W)
            ut = _rows(u, r, ok, D, 0, C, CH, VEC)
            vt = _rows(v, r, ok, D, 0, C, CH, VEC)
            g = tl.load(gates + q, mask=ok, other=0.0).to(tl.float32)
            s = tl.sum(tl.sum(ut * xr, 2), 0)  # (W,) a warp's shuffles per row
            tl.store(pre + q, s, mask=qm)
            acc += vt * tl.where(ok, g * _act(s, GELU), 0.0)[None, :, None]
        _put(y, p, D, 0, tl.sum(acc, 1), C, CH, VEC)  # the one cross-warp reduction
    else:
        for q0 in tl.range(start, end, W, num_stages=STAGES):  # the dots, over U
            q, qm, ok, r = _sel(rows, q0, end, N, W)
            tl.store(pre + q, _dots(u, r, ok, x, p, D, C, CH, VEC, PARTS), mask=qm)
        tl.debug_barrier()  # pre written by other threads of this program
        for k in tl.static_range(PARTS):  # the sums over V, a column part at a time
            acc = tl.zeros([C, W, CH], dtype=tl.float32)
            for q0 in tl.range(start, end, W, num_stages=STAGES):
                q, qm, ok, r = _sel(rows, q0, end, N, W)
                vt = _rows(v, r, ok, D, k * C * CH, C, CH, VEC)  # issued before the weights
                s = tl.load(pre + q, mask=qm, other=0.0)
                g = tl.load(gates + q, mask=ok, other=0.0).to(tl.float32)
                acc += vt * tl.where(ok, g * _act(s, GELU), 0.0)[None, :, None]
            _put(y, p, D, k * C * CH, tl.sum(acc, 1), C, CH, VEC)


@triton.jit
def _bag_weights(dw, q, qm, ok, gates, pre, dg, ds, ga, GELU: tl.constexpr):
    """From dw = V rows . dy (W,): dgates, ds = dw * g * act'(pre) and g * act(pre), stored;
    returns ds (0 where not ok)."""
    s = tl.load(pre + q, mask=qm, other=0.0)
    g = tl.load(gates + q, mask=qm, other=0.0).to(tl.float32)
    a = _act(s, GELU)
    dsq = tl.where(ok, dw * g * _dact(s, GELU), 0.0)
    tl.store(dg + q, (dw * a).to(dg.dtype.element_ty), mask=qm)
    tl.store(ds + q, dsq, mask=qm)
    tl.store(ga + q, g * a, mask=qm)
    return dsq


@triton.jit
def mix_bwd_bags(dy, rows, offs, gates, pre, u, v, dx, dg, ds, ga, N, D, GELU: tl.constexpr,
                 W: tl.constexpr, C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr,
                 PARTS: tl.constexpr, STAGES: tl.constexpr):
    p, start, end = _run(offs)
    if PARTS == 1:
        dyr = _vec(dy, p, D, 0, C, CH, VEC)
        acc = tl.zeros([C, W, CH], dtype=tl.float32)
        for q0 in tl.range(start, end, W, num_stages=STAGES):
            q, qm, ok, r = _sel(rows, q0, end, N, W)
            ut = _rows(u, r, ok, D, 0, C, CH, VEC)  # issued first, used last
            vt = _rows(v, r, ok, D, 0, C, CH, VEC)
            dsq = _bag_weights(tl.sum(tl.sum(vt * dyr, 2), 0), q, qm, ok, gates, pre, dg, ds,
                               ga, GELU)
            acc += ut * dsq[None, :, None]
        _put(dx, p, D, 0, tl.sum(acc, 1), C, CH, VEC)
    else:
        for q0 in tl.range(start, end, W, num_stages=STAGES):  # the dots, over V
            q, qm, ok, r = _sel(rows, q0, end, N, W)
            _bag_weights(_dots(v, r, ok, dy, p, D, C, CH, VEC, PARTS), q, qm, ok, gates, pre,
                         dg, ds, ga, GELU)
        tl.debug_barrier()  # ds written by other threads of this program
        for k in tl.static_range(PARTS):  # dx over U, a column part at a time
            acc = tl.zeros([C, W, CH], dtype=tl.float32)
            for q0 in tl.range(start, end, W, num_stages=STAGES):
                q, qm, ok, r = _sel(rows, q0, end, N, W)
                ut = _rows(u, r, ok, D, k * C * CH, C, CH, VEC)  # issued before the weights
                acc += ut * tl.load(ds + q, mask=ok, other=0.0)[None, :, None]
            _put(dx, p, D, k * C * CH, tl.sum(acc, 1), C, CH, VEC)


@triton.jit
def row_grads(x, dy, order, bag, roffs, ds, ga, du, dv, R, P, D, W: tl.constexpr,
              C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr, PARTS: tl.constexpr,
              STAGES: tl.constexpr):
    """W unique rows per program, a warp each: warp w walks row (program * W + w)'s
    selections, one a step, loading x[bag] and dy[bag] (the "rows" here); its sums are its
    own, so no reduction crosses warps and each gradient row is written once."""
    j = tl.program_id(0).to(tl.int64) * W + tl.arange(0, W)  # (W,) unique-row numbers
    jm = j < R
    start = tl.load(roffs + j, mask=jm, other=0)
    count = tl.load(roffs + j + 1, mask=jm, other=0) - start
    for k in tl.static_range(PARTS):
        acc_u = tl.zeros([C, W, CH], dtype=tl.float32)
        acc_v = tl.zeros([C, W, CH], dtype=tl.float32)
        for i in tl.range(0, tl.max(count, 0), num_stages=STAGES):
            km = i < count
            sel = tl.load(order + start + i, mask=km, other=0)
            b = tl.load(bag + start + i, mask=km, other=0)
            ok = km & (b >= 0) & (b < P)
            xt = _rows(x, tl.where(ok, b, 0), ok, D, k * C * CH, C, CH, VEC)
            dyt = _rows(dy, tl.where(ok, b, 0), ok, D, k * C * CH, C, CH, VEC)
            acc_u += xt * tl.load(ds + sel, mask=ok, other=0.0)[None, :, None]
            acc_v += dyt * tl.load(ga + sel, mask=ok, other=0.0)[None, :, None]
        _put_rows(du, j, jm, D, k * C * CH, acc_u, C, CH, VEC)
        _put_rows(dv, j, jm, D, k * C * CH, acc_v, C, CH, VEC)


@triton.jit
def _rounded(val, t):
    """fp32 val in t's element type; to bf16 rounded to nearest, ties to even, spelt out
    (the interpreter truncates; on a GPU this equals the hardware conversion)."""
    if t.dtype.element_ty == tl.bfloat16:
        b = val.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        val = tl.where(val != val, val, b.to(tl.float32, bitcast=True))  # NaN stays NaN
    return val.to(t.dtype.element_ty)


@triton.jit
def _put_rows(t, j, jm, D, c0, val, C: tl.constexpr, CH: tl.constexpr, VEC: tl.constexpr):
    """Rows j (W,) of t where jm, columns [c0, c0 + C * CH) <- val (C, W, CH)."""
    cols = _cols(c0, C, CH)
    m = jm[None, :, None] & _colmask(cols, D, VEC)
    tl.store(t + tl.multiple_of(j * D, VEC)[None, :, None] + cols, _rounded(val, t), mask=m)


# The row optimizers (launched by peer_dist/ops/triton_optim.py): W touched rows a program, a
# warp a row; every value in fp32, rounded once into the table's or state's dtype.


@triton.jit
def _row_scalars(t, j, jm, other):
    """(W,) fp32 values t[j] where jm."""
    return tl.load(t + j, mask=jm, other=other).to(tl.float32)


@triton.jit
def adam_rows(p, rows, m, v, grad, row_bc, b1, c1, b2, c2, eps, step, ib2, R, D,
              PER_ROW: tl.constexpr, W: tl.constexpr, C: tl.constexpr, CH: tl.constexpr,
              VEC: tl.constexpr, PARTS: tl.constexpr, STAGES: tl.constexpr):
    """Lazy Adam on rows[j] (W of the R unique rows), grad (R, D) row j: m = b1 m + c1 g,
    v = b2 v + c2 g^2, p -= step * m / (sqrt(v * ib2) + eps); step = lr / bc1 and ib2 =
    1 / bc2, or per row from row_bc (R, 2) float64 (lr is folded in by the caller)."""
    j = tl.program_id(0).to(tl.int64) * W + tl.arange(0, W)
    jm = j < R
    e = tl.load(rows + j, mask=jm, other=0)
    if PER_ROW:
        st = step / _row_scalars(row_bc, 2 * j, jm, 1.0)  # step here is lr
        i2 = 1.0 / _row_scalars(row_bc, 2 * j + 1, jm, 1.0)
    else:
        st = tl.zeros([W], dtype=tl.float32) + step
        i2 = tl.zeros([W], dtype=tl.float32) + ib2
    for k in range(PARTS):
        c0 = k * C * CH
        g = _rows(grad, j, jm, D, c0, C, CH, VEC)
        mn = _rows(m, e, jm, D, c0, C, CH, VEC) * b1 + c1 * g
        vn = _rows(v, e, jm, D, c0, C, CH, VEC) * b2 + c2 * g * g
        pt = _rows(p, e, jm, D, c0, C, CH, VEC)
        den = tl.sqrt_rn(vn * i2[None, :, None]) + eps
        _put_rows(m, e, jm, D, c0, mn, C, CH, VEC)
        _put_rows(v, e, jm, D, c0, vn, C, CH, VEC)
        _put_rows(p, e, jm, D, c0, pt - tl.div_rn(st[None, :, None] * mn, den), C, CH, VEC)


@triton.jit
def adagrad_rows(p, rows, acc, grad, lr, eps, R, D, W: tl.constexpr, C: tl.constexpr,
                 CH: tl.constexpr, VEC: tl.constexpr, PARTS: tl.constexpr,
                 STAGES: tl.constexpr):
    """Row-wise Adagrad: acc[e] += mean(g^2), p[e] -= lr * g / (sqrt(acc[e]) + eps)."""
    j = tl.program_id(0).to(tl.int64) * W + tl.arange(0, W)
    jm = j < R
    e = tl.load(rows + j, mask=jm, other=0)
    sq = tl.zeros([C, W, CH], dtype=tl.float32)
    for k in range(PARTS):  # the whole row's sum of squares first
        g = _rows(grad, j, jm, D, k * C * CH, C, CH, VEC)
        sq += g * g
    a = _row_scalars(acc, e, jm, 0.0) + tl.div_rn(tl.sum(tl.sum(sq, 2), 0), D.to(tl.float32))
    tl.store(acc + e, _rounded(a, acc), mask=jm)
    scale = tl.div_rn(tl.zeros([W], dtype=tl.float32) - lr, tl.sqrt_rn(a) + eps)
    for k in range(PARTS):  # one part: the gradient is still in registers
        c0 = k * C * CH
        g = _rows(grad, j, jm, D, c0, C, CH, VEC)
        pt = _rows(p, e, jm, D, c0, C, CH, VEC)
        _put_rows(p, e, jm, D, c0, pt + scale[None, :, None] * g, C, CH, VEC)
