"""Fused CPU kernels for the PEER expert mix and the row-sparse table optimizers.

Plain C in csrc/ (built once per machine by build.py into a per-user cache), called through
ctypes on the tensors' memory; no torch headers, so it builds fast and against any torch
version. Every kernel has a pure-PyTorch twin (ops/rows.py, ops/mix.py, the optimizer's torch
path) that is used when no compiler is present, for other devices, and in the tests as the
reference.

Why: the PyTorch ops each make a full pass (and a fresh, page-faulting allocation) per step.
Here the selections are grouped by table row once (a counting pass over the ids, no sort), and
forward and backward each walk the unique rows in ascending order: each selected row of U and V
is read once per pass however many tokens chose it, and the backward writes dx, dgates and both
row-sparse table gradients in that same pass. The optimizers update touched rows in place
without (rows, D) temporaries. Product-key selection is one pass per score row.

Work is split over threads by the caller (Python threads; ctypes releases the GIL), so no
second OpenMP runtime is loaded beside torch's.

Shape legend: T = tokens, S = selections per token, D = dim, N = table rows, M = T * S,
R = unique rows selected.
"""

from __future__ import annotations

import ctypes
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from peer_dist.ops.build import KernelLibrary

_I64, _F64 = ctypes.c_int64, ctypes.c_double
_P = ctypes.c_void_p
_SIGNATURES = {
    "adam_rows": [_I64, _I64, _I64, _P, _P, _P, _P, _P, _F64, _F64, _F64, _F64, _F64, _F64, _P],
    "adagrad_rows": [_I64, _I64, _I64, _P, _P, _P, _P, _F64, _F64],
    "rows_fwd": [_I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int, _P, _P],
    "rows_bwd": [_I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int, _F64,
                 _P, _P, _P, _P],
    "pk_select": [_I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P],
    "key_grad": [_I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P],
}

def _declare(lib: ctypes.CDLL) -> None:
    for name, args in _SIGNATURES.items():
        for sfx in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{sfx}")
            fn.argtypes, fn.restype = args, None
    for name in ("adam_rows", "adagrad_rows"):  # fp32 tables, bf16 optimizer state
        fn = getattr(lib, f"{name}_bf16")
        fn.argtypes, fn.restype = _SIGNATURES[name], None
    lib.group_rows.argtypes = [_I64, _I64, _P, _P, _P, _P, _P]
    lib.group_rows.restype = _I64
    lib.touch_pages.argtypes = [_P, _I64, _I64]
    lib.touch_pages.restype = None


LIB = KernelLibrary(_declare)


def use_fused_cpu(enabled: bool | None) -> None:
    """Force the fused CPU kernels on (True: error if they cannot be built), off (False), or
    back to the default (None: on when a C compiler is present)."""
    LIB.enabled = enabled


def library() -> ctypes.CDLL | None:
    return LIB.get()


def usable(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels can take these tensors (CPU, fp32/fp64, one dtype)."""
    float_dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return (len(float_dtypes) == 1 and float_dtypes <= {torch.float32, torch.float64}
            and all(t.device.type == "cpu" for t in tensors) and library() is not None)


def usable_bf16_state(p: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> bool:
    """True when the fused optimizer kernels can update fp32 p with grad and bf16 state."""
    return (p.dtype == grad.dtype == torch.float32
            and all(t.dtype == torch.bfloat16 for t in state)
            and all(t.device.type == "cpu" for t in (p, grad, *state)) and library() is not None)


_MADV_HUGEPAGE = 14
_HUGE_MIN_BYTES = 4 << 20
_libc: ctypes.CDLL | None | bool = None


def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.empty, but a large buffer is marked for transparent huge pages and faulted in from
    one thread: the gradient rows are fresh memory every step, and faulting them in 2 MiB pages
    instead of 4 KiB ones measured 2.4x faster here (the contents stay undefined, as with
    torch.empty). Plain torch.empty where madvise is unavailable."""
    global _libc
    out = torch.empty(*shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes < _HUGE_MIN_BYTES or _libc is False:
        return out
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
            return out
    start = (out.data_ptr() + 4095) & ~4095
    stop = (out.data_ptr() + nbytes) & ~4095
    _libc.madvise(start, stop - start, _MADV_HUGEPAGE)  # advice only: failure is harmless
    lib = library()
    if lib is not None:
        lib.touch_pages(out.data_ptr(), nbytes, 4096)
    return out


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class BufferPool:
    """Large scratch and gradient buffers, handed out again once nobody else holds them.

    Fresh memory costs a page fault per page on first touch (the gradient rows alone are
    2 * R * D * 4 bytes per layer and step): a buffer whose storage is referenced only by this
    pool (the previous step's grads were freed) is reused instead. Reuse is decided by the
    storage reference count, so a buffer still held anywhere (a .grad kept for accumulation,
    a user's reference) is never handed out twice.
    """

    def __init__(self, max_buffers: int = 16, headroom: float = 1.02, min_bytes: int = 1 << 20):
        self.max_buffers, self.headroom, self.min_bytes = max_buffers, headroom, min_bytes
        self._bufs: list[tuple[torch.Tensor, int]] = []  # (flat buffer, refs when idle)
        self._lock = threading.Lock()
        try:
            _storage_refs(torch.empty(1))
            self.enabled = True
        except (AttributeError, RuntimeError):  # private API gone: allocate every time
            self.enabled = False

    def take(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if not self.enabled or nbytes < self.min_bytes:
            return empty(*shape, dtype=dtype)
        with self._lock:  # the idle check and the hand-out (a new view) must be one step
            for buf, idle in self._bufs:
                if buf.dtype == dtype and buf.numel() >= numel and _storage_refs(buf) == idle:
                    return buf[:numel].view(shape)
            # idle buffers too small for this request would only add to the peak: let them go
            self._bufs = [(b, idle) for b, idle in self._bufs
                          if b.dtype != dtype or b.numel() >= numel or _storage_refs(b) != idle]
            buf = empty(int(numel * self.headroom), dtype=dtype)
            self._bufs.append((buf, _storage_refs(buf)))
            if len(self._bufs) > self.max_buffers:  # drop the oldest idle one
                for i, (b, idle) in enumerate(self._bufs):
                    if _storage_refs(b) == idle:
                        del self._bufs[i]
                        break
            return buf[:numel].view(shape)

    def clear(self) -> None:
        """Let the idle buffers go (memory held between steps returns to the system)."""
        with self._lock:
            self._bufs.clear()


pool = BufferPool()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _parallel(fn, total: int, *args, grain: int = 16) -> None:
    """fn(lo, hi, *args) over [0, total) split into torch.get_num_threads() ranges of at
    least `grain` items."""
    nt = max(1, min(torch.get_num_threads(), total // grain))
    if nt == 1:
        fn(0, total, *args)
        return
    bounds = [total * i // nt for i in range(nt + 1)]
    _run_all(fn, [(bounds[i], bounds[i + 1], *args) for i in range(nt)])


def _parallel_partials(fn, total: int, out: torch.Tensor, *args, grain: int = 64) -> torch.Tensor:
    """Like _parallel, but each range accumulates into its own zeroed copy of `out` (passed
    as fn's last argument); returns their sum. For scattered adds without atomics."""
    nt = max(1, min(torch.get_num_threads(), total // grain))
    if nt == 1:
        out.zero_()
        fn(0, total, *args, _ptr(out))
        return out
    parts = torch.zeros(nt, *out.shape, dtype=out.dtype)
    bounds = [total * i // nt for i in range(nt + 1)]
    calls = [(bounds[i], bounds[i + 1], *args, _ptr(parts[i])) for i in range(nt)]
    _run_all(fn, calls)
    return torch.sum(parts, dim=0, out=out)


class _Runner:
    """A thread pool grown to the largest fan-out asked of it (ctypes releases the GIL)."""

    def __init__(self):
        self.pool: ThreadPoolExecutor | None = None
        self.size = 0

    def run(self, fn, calls: list[tuple]) -> None:
        if self.pool is None or self.size < len(calls):
            self.pool = ThreadPoolExecutor(max_workers=len(calls),
                                           thread_name_prefix="peer_kernel")
            self.size = len(calls)
        for f in [self.pool.submit(fn, *c) for c in calls]:
            f.result()


_runner = _Runner()


def _run_all(fn, calls: list[tuple]) -> None:
    _runner.run(fn, calls)


def group_rows(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (M,) in [0, n) -> rows (R,) sorted unique, offsets (R+1,), order (M,)."""
    m = ids.numel()
    count = pool.take(n, dtype=torch.int64).zero_()
    rows = torch.empty(m, dtype=torch.int64)
    offsets = torch.empty(m + 1, dtype=torch.int64)
    order = torch.empty(m, dtype=torch.int64)
    r = library().group_rows(m, n, _ptr(ids), _ptr(count), _ptr(rows), _ptr(offsets),
                             _ptr(order))
    if r < 0:
        raise IndexError(f"expert ids must lie in [0, {n}), got [{int(ids.min())}, "
                         f"{int(ids.max())}]")
    return rows[:r], offsets[:r + 1], order


def check_rows(rows: torch.Tensor, n: int, what: str) -> None:
    """IndexError unless every row index lies in [0, n): checked before a kernel touches one."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise IndexError(f"{what} must lie in [0, {n}), got [{int(rows.min())}, "
                         f"{int(rows.max())}]")


def rows_forward(groups, x, gates, u, v, gelu: bool):
    """Row-major forward over groups (RowGroups of Q selections into P bags, x (P, D),
    gates (Q,)) -> y (P, D), pre-activations (Q,)."""
    pre = torch.empty(gates.shape, dtype=x.dtype)
    y = torch.empty(x.shape, dtype=x.dtype)
    fn = getattr(library(), f"rows_fwd_{_sfx(x)}")
    y = _parallel_partials(fn, groups.rows.numel(), y, x.shape[1], _ptr(groups.rows),
                           _ptr(groups.offsets), _ptr(groups.order), _ptr(groups.bag), _ptr(x),
                           _ptr(gates), _ptr(u), _ptr(v), int(gelu), _ptr(pre))
    return y, pre


def rows_backward(groups, x, dy, gates, pre, u, v, gelu: bool, table_scale: float = 1.0):
    """Row-major backward: -> dx (P, D), dgates (Q,), du (R, D), dv (R, D); du and dv times
    table_scale (folded into each selection's weight)."""
    d, r = x.shape[1], groups.rows.numel()
    dg = torch.empty(gates.shape, dtype=x.dtype)
    du, dv = pool.take(r, d, dtype=x.dtype), pool.take(r, d, dtype=x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype)
    fn = getattr(library(), f"rows_bwd_{_sfx(x)}")
    dx = _parallel_partials(fn, r, dx, d, _ptr(groups.rows), _ptr(groups.offsets),
                            _ptr(groups.order), _ptr(groups.bag), _ptr(x), _ptr(dy),
                            _ptr(gates), _ptr(pre), _ptr(u), _ptr(v), int(gelu),
                            float(table_scale), _ptr(dg), _ptr(du), _ptr(dv))
    return dx, dg, du, dv


def _sfx(t: torch.Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


def _state_sfx(p: torch.Tensor, state: torch.Tensor) -> str:
    """Kernel suffix for optimizer tables: bf16 for bf16 state (fp32 p), else p's dtype."""
    return "bf16" if state.dtype == torch.bfloat16 else _sfx(p)


def _check_row_update(p, rows, grad, *state) -> None:
    """Shapes and row ids of an in-place row update, checked before the kernel runs."""
    if grad.shape != (rows.numel(), p.shape[1]) or any(s.shape[0] != p.shape[0] for s in state):
        raise ValueError(f"row update: grad {tuple(grad.shape)} for {rows.numel()} rows of a "
                         f"{tuple(p.shape)} table; allowed is grad (rows, {p.shape[1]})")
    check_rows(rows, p.shape[0], "gradient rows")


def adam_rows(p, m, v, rows, grad, lr: float, b1: float, b2: float, eps: float, bc1: float,
              bc2: float, row_bc: torch.Tensor | None = None) -> None:
    """Lazy Adam in place on p, m, v (N, D) for unique rows (R,) with grad (R, D); m and v
    have p's dtype, or are bf16 beside fp32 p. Bias corrections bc1, bc2 for all rows, or per
    row: row_bc (R, 2) float64."""
    _check_row_update(p, rows, grad, m, v)
    if row_bc is not None and (row_bc.shape != (rows.numel(), 2) or row_bc.dtype != torch.float64
                               or not row_bc.is_contiguous()):
        raise ValueError(f"adam_rows: row_bc {tuple(row_bc.shape)} {row_bc.dtype}; allowed is "
                         f"a contiguous ({rows.numel()}, 2) float64 tensor")
    fn = getattr(library(), f"adam_rows_{_state_sfx(p, m)}")
    _parallel(fn, rows.numel(), p.shape[1], _ptr(rows), _ptr(grad), _ptr(p), _ptr(m), _ptr(v),
              lr, b1, b2, eps, bc1, bc2, None if row_bc is None else _ptr(row_bc))


def adagrad_rows(p, acc, rows, grad, lr: float, eps: float) -> None:
    """Row-wise Adagrad in place on p (N, D), acc (N,) for unique rows (R,), grad (R, D);
    acc has p's dtype, or is bf16 beside fp32 p."""
    _check_row_update(p, rows, grad, acc)
    fn = getattr(library(), f"adagrad_rows_{_state_sfx(p, acc)}")
    _parallel(fn, rows.numel(), p.shape[1], _ptr(rows), _ptr(grad), _ptr(p), _ptr(acc), lr, eps)


def pk_select(scores: torch.Tensor, pi: torch.Tensor, pj: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (2H, T, n) contiguous -> sub-key ids sel1, sel2 (H, T, k) of the exact top-k
    among the candidate pairs (pi[c], pj[c]) of each head's two sorted top-k lists."""
    c, t, n = scores.shape
    h = c // 2
    if not 1 <= k <= n or pi.numel() < k or pi.shape != pj.shape:
        raise ValueError(f"pk_select: topk={k} with {n} sub-keys and {pi.numel()} candidate "
                         f"pairs; allowed is 1 <= topk <= {n} and at least topk pairs")
    sel1 = torch.empty(h, t, k, dtype=torch.int64)
    sel2 = torch.empty(h, t, k, dtype=torch.int64)
    fn = getattr(library(), f"pk_select_{_sfx(scores)}")
    _parallel(fn, h * t, t, n, k, pi.numel(), _ptr(scores), _ptr(pi), _ptr(pj), _ptr(sel1),
              _ptr(sel2))
    return sel1, sel2


def key_grad(sel: torch.Tensor, grad: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
    """sel (C, T, K), grad (C, T, K), q (C, T, Qh) contiguous -> dkeys (C, n, Qh)."""
    c, t, k = sel.shape
    check_rows(sel, n, "sub-key ids")
    dkeys = torch.zeros(c, n, q.shape[-1], dtype=q.dtype)
    fn = getattr(library(), f"key_grad_{_sfx(q)}")
    _parallel(fn, c, t, n, k, q.shape[-1], _ptr(sel), _ptr(grad), _ptr(q), _ptr(dkeys),
              grain=1)
    return dkeys
