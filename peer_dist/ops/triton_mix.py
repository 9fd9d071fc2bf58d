"""Triton kernels for the expert mix on CUDA (and on CPU tensors under TRITON_INTERPRET=1,
which is how CI checks them against the same oracle as the C and PyTorch paths): when they
run (`takes`), the launch parameters chosen by d (`plan`) and their launches. The kernels are
in triton_kernels.py, imported on first use; peer-bench kernels compiles them for sm_80 and
sm_90 with exactly these parameters.

Shape legend: P = bags (tokens), Q = selections, D = dim, N = table rows, R = unique rows.
Selections arrive bag-major: bag p owns selections [offs[p], offs[p+1]) (CSR offsets).

    mix_fwd       one program per bag: W rows of U and of V a tile (a warp per row), each
                  U row dotted with x[p] (fp32) by its warp, act, gate, and the gate-weighted
                  sum of the V rows: y[p] (P, D) and pre (Q,) fp32. Never a (P, S, D) tensor.
    mix_bwd_bags  one program per bag: dw = V rows . dy[p], dgates = dw * act(pre),
                  ds = dw * g * act'(pre) (saved for the tables), dx[p] = sum ds * U rows.
    row_grads     W unique rows per program, a warp each (selections sorted by row,
                  RowGroups): du[r] = sum ds * x[bag], dv[r] = sum g * act(pre) * dy[bag].
                  Each row's gradient is written once by one warp: hot rows never serialise
                  on atomics.

Activations (x, dy) and tables may be fp32, bf16 or fp16, each its own (U and V one dtype);
every sum is fp32. Row ids are checked against N on the host before any launch (a clear
IndexError), and every kernel also masks rows outside [0, N), so a bad id can never read or
write outside a table.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_DIM = 8192  # past this the column parts grow past 8; wider tables take the PyTorch path
PART_COLS = 1024  # columns of a row a lane holds at once: 32 lanes x (C * VEC <= 32) values
NUM_WARPS = 8  # a warp per row: 8 rows of U and 8 of V in flight per program and tile
# (warps, rows a warp) by (kernel, bytes a value) where they differ: with 8 warps of one row
# ptxas starts the backward's V dots before its U rows are loaded (12 KB in flight a program
# at d = 1024 bf16, peer-bench kernels); 4 warps of two rows keep the whole tile in flight
# (30 KB). Not for fp32 tables (255 registers, a spill at d = 1000), nor for rows of several
# column parts (12 KB an SM at d = 8192 bf16 on sm_90, against 32 KB with 8 warps).
WARPS = {("mix_bwd_bags", 2): (4, 2)}
# Software prefetch depth of the tile loops (tl.range num_stages). 2 or 3 copy the next tiles
# through shared memory (cp.async); at d = 1024 bf16 the forward's estimate (peer-bench
# kernels, sm_90) is 32 KB in flight an SM with 2 (one program: 142 registers, 33 KB of
# shared memory) and 64 KB with 3 (66 KB of shared memory a program), against 64 KB with 1
# and no shared memory for tiles: the registers already hold a whole tile a warp.
STAGES = 1


class _Switch:
    """None: Triton on CUDA tensors when it imports; True: also on CPU tensors (the
    interpreter, for tests); False: never."""

    def __init__(self):
        self.enabled: bool | None = None


SWITCH = _Switch()


def use_triton(enabled: bool | None) -> None:
    SWITCH.enabled = enabled


@functools.cache
def installed() -> bool:
    """Whether triton can be imported (checked without importing it: ~0.5 s a process)."""
    return importlib.util.find_spec("triton") is not None


def _kernels():
    """The kernels module, imported (and triton with it) on first use."""
    return importlib.import_module("peer_dist.ops.triton_kernels")


def available() -> bool:
    return SWITCH.enabled is not False and installed()


def takes(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """True when the Triton kernels run this mix: CUDA tensors (or CPU ones under the
    interpreter when forced on), float dtypes the kernels load, tables (u and v when given)
    of one dtype, contiguous (the kernels index rows as r * D), on x's device, rows of at
    most MAX_DIM values. The bag-side operands are made contiguous by the launches."""
    tables = [u] if v is None else [u, v]
    if not available() or x.dtype not in FLOATS or u.dtype not in FLOATS:
        return False
    if any(t.dtype != u.dtype or t.shape != u.shape or t.device != x.device
           or not t.is_contiguous() for t in tables):
        return False
    if not (u.dim() == 2 and 0 < u.shape[1] <= MAX_DIM):
        return False
    if x.device.type == "cuda":
        return True
    return (SWITCH.enabled is True and x.device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET") == "1")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Launch parameters of one kernel at one d: a tile is W rows x (C * CH) columns, CH = 32
    lanes x VEC values (VEC: one 128-bit load where D allows), PARTS column parts a row."""

    num_warps: int
    W: int
    C: int
    CH: int
    VEC: int
    PARTS: int
    STAGES: int

    def constexprs(self) -> dict[str, int]:
        return dict(W=self.W, C=self.C, CH=self.CH, VEC=self.VEC, PARTS=self.PARTS,
                    STAGES=self.STAGES)


def plan(d: int, dtype: torch.dtype, kernel: str = "mix_fwd") -> Plan:
    """The launch parameters of `kernel` at dim d for rows of `dtype` (the tables' for the mix
    kernels and the row optimizers, the activations' for row_grads). VEC divides d, so rows
    of d values stay VEC-aligned; where a row's bytes are not a multiple of 16 the loads are
    narrower (8, 4, 2 bytes), the stated fallback: correct, slower."""
    size = torch.empty((), dtype=dtype).element_size()
    vec = 16 // size
    while d % vec:
        vec //= 2
    ch = 32 * vec
    chunks = -(-d // ch)
    c = min(1 << (chunks - 1).bit_length(), max(1, PART_COLS // ch))
    parts = -(-chunks // c)
    # short rows: two a warp, as many bytes a tile; WARPS where a row is one column part
    default = (NUM_WARPS, 2 if c * vec <= 8 else 1)
    warps, rows_per_warp = WARPS.get((kernel, size), default) if parts == 1 else default
    return Plan(warps, warps * rows_per_warp, c, ch, vec, parts, STAGES)


def _launch(kernel, grid: int, pl: Plan, *args, **constexprs) -> None:
    kernel[(grid,)](*args, **constexprs, **pl.constexprs(), num_warps=pl.num_warps)


def forward(x, rows, offs, gates, u, v, gelu: bool):
    """x (P, D), rows (Q,) int64, offs (P+1,) int64, gates (Q,) -> y (P, D) in x's dtype,
    pre (Q,) fp32."""
    x, rows, offs, gates = (t.contiguous() for t in (x, rows, offs, gates))
    p, d = x.shape
    y = torch.empty_like(x)
    pre = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    if p:
        _launch(_kernels().mix_fwd, p, plan(d, u.dtype), x, rows, offs, gates, u, v, y, pre,
                u.shape[0], d, GELU=gelu)
    return y, pre


def backward_bags(dy, rows, offs, gates, pre, u, v, gelu: bool):
    """-> dx (P, D) in dy's dtype, dgates (Q,) in gates' dtype, ds and g * act(pre) (Q,) fp32
    (the weights of the two table gradients)."""
    dy, rows, offs, gates, pre = (t.contiguous() for t in (dy, rows, offs, gates, pre))
    p, d = dy.shape
    dx = torch.empty_like(dy)
    dg = torch.empty_like(gates)
    ds = torch.empty(rows.shape, dtype=torch.float32, device=dy.device)
    ga = torch.empty_like(ds)
    if p:
        _launch(_kernels().mix_bwd_bags, p, plan(d, u.dtype, "mix_bwd_bags"), dy, rows, offs,
                gates, pre, u, v, dx, dg, ds, ga, u.shape[0], d, GELU=gelu)
    return dx, dg, ds, ga


def row_grads(groups, x, dy, ds, ga, dtype: torch.dtype):
    """groups: RowGroups of the selections -> du, dv (R, D) in `dtype` (the tables')."""
    x, dy = x.contiguous(), dy.contiguous()
    r, d = groups.rows.numel(), x.shape[1]
    du = torch.empty(r, d, dtype=dtype, device=x.device)
    dv = torch.empty_like(du)
    if r:
        pl = plan(d, x.dtype, "row_grads")
        _launch(_kernels().row_grads, -(-r // pl.W), pl, x, dy, groups.order.contiguous(),
                groups.bag.contiguous(), groups.offsets.contiguous(), ds, ga, du, dv, r,
                x.shape[0], d)
    return du, dv
