"""Triton kernels for the expert mix on CUDA (and on CPU tensors under TRITON_INTERPRET=1,
which is how CI checks them against the same oracle as the C and PyTorch paths).

Shape legend: P = bags (tokens), Q = selections, D = dim, N = table rows, R = unique rows.
Selections arrive bag-major: bag p owns selections [offs[p], offs[p+1]) (CSR offsets).

    mix_fwd       one program per bag: S rows of U dotted with x[p] (fp32), act, gate, and the
                  gate-weighted sum of the same S rows of V: y[p] (P, D) and pre (Q,) fp32.
                  Never a (P, S, D) tensor: rows stream through registers BLOCK_S at a time.
    mix_bwd_bags  one program per bag: dw = V rows . dy[p], dgates = dw * act(pre),
                  ds = dw * g * act'(pre) (saved for the tables), dx[p] = sum ds * U rows.
    row_grads     one program per unique row (selections sorted by row, RowGroups): du[r] =
                  sum ds * x[bag], dv[r] = sum g * act(pre) * dy[bag]. Each row's gradient is
                  written once by one program: hot rows never serialise on atomics.

Activations (x, dy) and tables may be fp32, bf16 or fp16, each its own; every sum is fp32.
Row ids are checked against N on the host before any launch (a clear IndexError), and every
kernel also masks rows outside [0, N), so a bad id can never read or write outside a table.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the C kernels and PyTorch serve instead
    triton = None
    tl = None

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_DIM = 8192  # one row in registers per program; wider tables take the PyTorch path
TILE = 4096  # BLOCK_S * BLOCK_D elements per loaded tile


class _Switch:
    """None: Triton on CUDA tensors when it imports; True: also on CPU tensors (the
    interpreter, for tests); False: never."""

    def __init__(self):
        self.enabled: bool | None = None


SWITCH = _Switch()


def use_triton(enabled: bool | None) -> None:
    SWITCH.enabled = enabled


def available() -> bool:
    return triton is not None and SWITCH.enabled is not False


def takes(x: torch.Tensor, u: torch.Tensor) -> bool:
    """True when the Triton kernels run this mix: CUDA tensors (or CPU ones under the
    interpreter when forced on), float dtypes the kernels load, rows that fit a program."""
    if not available() or x.dtype not in FLOATS or u.dtype not in FLOATS:
        return False
    if not (0 < u.shape[1] <= MAX_DIM and u.is_contiguous()):
        return False
    if x.device.type == "cuda" and u.device == x.device:
        return True
    return (SWITCH.enabled is True and x.device.type == u.device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET") == "1")


def _blocks(d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    return max(1, min(32, TILE // block_d)), block_d


if triton is not None:

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
    def _mix_fwd(x, rows, offs, gates, u, v, y, pre, N, D, GELU: tl.constexpr,
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
    def _mix_bwd_bags(dy, rows, offs, gates, pre, u, v, dx, dg, ds, ga, N, D,
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
    def _row_grads(x, dy, order, bag, roffs, ds, ga, du, dv, P, D,
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


def forward(x, rows, offs, gates, u, v, gelu: bool):
    """x (P, D), rows (Q,) int64, offs (P+1,) int64, gates (Q,) -> y (P, D) in x's dtype,
    pre (Q,) fp32."""
    p, d = x.shape
    y = torch.empty_like(x)
    pre = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    if p:
        bs, bd = _blocks(d)
        _mix_fwd[(p,)](x, rows, offs, gates, u, v, y, pre, u.shape[0], d, GELU=gelu,
                       BLOCK_S=bs, BLOCK_D=bd)
    return y, pre


def backward_bags(dy, rows, offs, gates, pre, u, v, gelu: bool):
    """-> dx (P, D) in dy's dtype, dgates (Q,) in gates' dtype, ds and g * act(pre) (Q,) fp32
    (the weights of the two table gradients)."""
    p, d = dy.shape
    dx = torch.empty_like(dy)
    dg = torch.empty_like(gates)
    ds = torch.empty(rows.shape, dtype=torch.float32, device=dy.device)
    ga = torch.empty_like(ds)
    if p:
        bs, bd = _blocks(d)
        _mix_bwd_bags[(p,)](dy, rows, offs, gates, pre, u, v, dx, dg, ds, ga, u.shape[0], d,
                            GELU=gelu, BLOCK_S=bs, BLOCK_D=bd)
    return dx, dg, ds, ga


def row_grads(groups, x, dy, ds, ga, dtype: torch.dtype):
    """groups: RowGroups of the selections -> du, dv (R, D) in `dtype` (the tables')."""
    r, d = groups.rows.numel(), x.shape[1]
    du = torch.empty(r, d, dtype=dtype, device=x.device)
    dv = torch.empty_like(du)
    if r:
        bs, bd = _blocks(d)
        _row_grads[(r,)](x, dy, groups.order, groups.bag, groups.offsets, ds, ga, du, dv,
                         x.shape[0], d, BLOCK_S=bs, BLOCK_D=bd)
    return du, dv
