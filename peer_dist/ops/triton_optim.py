"""Fused row-sparse optimizer steps in Triton (CUDA; CPU tensors under TRITON_INTERPRET=1 in
the tests): lazy Adam (global or per-row bias correction) and row-wise Adagrad, the same
updates as the C row optimizers (peer_dist/ops/csrc/peer_optim.h) and the PyTorch path of
peer_dist/train/sparse_optim.py.

Shape legend: N = table rows, D = dim, R = touched (unique, sorted) rows.

Each program updates W touched rows, a warp a row (the tiles of triton_kernels.py): the row's
parameter, state and gradient are read once and written once, in place, in fp32 (fp32 or bf16
tables and state; bf16 values are rounded once, to nearest even, when stored); no (R, D)
temporary. Adagrad's accumulator needs the whole row's mean(g^2) before the update, so where
a row has several column parts its gradient is read twice (the second time mostly from L2).
The kernels are imported with triton on first use, like the mix's.
"""

from __future__ import annotations

import importlib

import torch

from peer_dist.ops import triton_mix

STATE = (torch.float32, torch.bfloat16)


def _kernels():
    """The kernels (in triton_kernels.py), imported with triton on first use."""
    return importlib.import_module("peer_dist.ops.triton_kernels")


def takes(p: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> bool:
    """True when the Triton row update runs: fp32 or bf16 table p (N, D), fp32 grad (R, D),
    fp32 or bf16 state, all contiguous on p's device; CUDA (or CPU with the interpreter
    forced on, as triton_mix.takes)."""
    if p.dtype not in STATE or grad.dtype != torch.float32 or p.dim() != 2:
        return False
    if any(s.dtype not in STATE or s.device != p.device or not s.is_contiguous()
           for s in state):
        return False
    if not (grad.device == p.device and grad.is_contiguous() and p.is_contiguous()):
        return False
    return triton_mix.takes(grad, p)


def _launch(name: str, p, rows, *args, **constexprs) -> None:
    r, d = rows.numel(), p.shape[1]
    if r:
        pl = triton_mix.plan(d, p.dtype, name)
        getattr(_kernels(), name)[(-(-r // pl.W),)](p, rows, *args, r, d, **constexprs,
                                                    **pl.constexprs(), num_warps=pl.num_warps)


def adam_rows(p, m, v, rows, grad, lr: float, b1: float, b2: float, eps: float, bc1: float,
              bc2: float, row_bc: torch.Tensor | None = None) -> None:
    """Lazy Adam in place on p, m, v (N, D) for unique rows (R,) with grad (R, D): bias
    corrections bc1, bc2 for all rows, or per row (row_bc (R, 2) float64 on p's device)."""
    per_row = row_bc is not None
    bc = row_bc.contiguous() if per_row else grad  # a placeholder never read
    # 1 - b1 and 1 - b2 in float64 here, rounded once to fp32 (as the C kernels do)
    _launch("adam_rows", p, rows.contiguous(), m, v, grad, bc, b1, 1.0 - b1, b2,
            1.0 - b2, eps, lr if per_row else lr / bc1, 1.0 / bc2, PER_ROW=per_row)


def adagrad_rows(p, acc, rows, grad, lr: float, eps: float) -> None:
    """Row-wise Adagrad in place on p (N, D) and acc (N,) for unique rows (R,)."""
    _launch("adagrad_rows", p, rows.contiguous(), acc, grad, lr, eps)
