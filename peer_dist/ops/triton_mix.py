"""Triton kernels for the expert mix on CUDA (and on CPU tensors under TRITON_INTERPRET=1,
which is how CI checks them against the same oracle as the C and PyTorch paths): when they
run (`takes`) and their launches. The kernels are in triton_kernels.py, imported on first use.

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

import functools
import importlib
import importlib.util
import os

import torch

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


@functools.cache
def installed() -> bool:
    """Whether triton can be imported (checked without importing it: ~0.5 s a process)."""
    return importlib.util.find_spec("triton") is not None


def _kernels():
    """The kernels module, imported (and triton with it) on first use."""
    return importlib.import_module("peer_dist.ops.triton_kernels")


def available() -> bool:
    return SWITCH.enabled is not False and installed()


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
    block_d = 1 << max(0, d - 1).bit_length()  # the next power of two
    return max(1, min(32, TILE // block_d)), block_d


def forward(x, rows, offs, gates, u, v, gelu: bool):
    """x (P, D), rows (Q,) int64, offs (P+1,) int64, gates (Q,) -> y (P, D) in x's dtype,
    pre (Q,) fp32."""
    p, d = x.shape
    y = torch.empty_like(x)
    pre = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    if p:
        bs, bd = _blocks(d)
        _kernels().mix_fwd[(p,)](x, rows, offs, gates, u, v, y, pre, u.shape[0], d,
                                 GELU=gelu, BLOCK_S=bs, BLOCK_D=bd)
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
        _kernels().mix_bwd_bags[(p,)](dy, rows, offs, gates, pre, u, v, dx, dg, ds, ga,
                                      u.shape[0], d, GELU=gelu, BLOCK_S=bs, BLOCK_D=bd)
    return dx, dg, ds, ga


def row_grads(groups, x, dy, ds, ga, dtype: torch.dtype):
    """groups: RowGroups of the selections -> du, dv (R, D) in `dtype` (the tables')."""
    r, d = groups.rows.numel(), x.shape[1]
    du = torch.empty(r, d, dtype=dtype, device=x.device)
    dv = torch.empty_like(du)
    if r:
        bs, bd = _blocks(d)
        _kernels().row_grads[(r,)](x, dy, groups.order, groups.bag, groups.offsets, ds, ga,
                                   du, dv, x.shape[0], d, BLOCK_S=bs, BLOCK_D=bd)
    return du, dv
