"""Row primitives on tables: the one home of "selections grouped by row" and of the private
aten op, each with a PyTorch path and (where it pays) the C path behind one function.

Shape legend: T = tokens (or bags), S = selections per token, Q = selections, D = dim,
N = table rows, R = unique rows selected.

    gather_dot(x, ids, w)          (T, S)  w[ids[t, s]] . x[t]
    ragged_dot(x, rows, bag, off, w) (Q,)  w[rows[q]] . x[bag[q]]   (bags of any size)
    bag_sum(ids, w, weights)       (T, D)  sum_s weights[t, s] * w[ids[t, s]]
    ragged_bag_sum(rows, off, w, weights)  the same over bags of any size
    RowGroups(rows, bag, n)        selections by unique row, once; .sums(x, w) (R, D)
    row_grad(groups, sums, n)      sparse COO (N, D) gradient with R rows
    coalesced(g)                   g marked coalesced when its rows are in order, else summed
    check_ids(ids, n)              IndexError unless every id lies in [0, n)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peer_dist.ops import cpu

_MODE_SUM = 0


class _PrivateOp:
    """embedding_bag's per-sample-weight backward kernel computes w[rows[q]] . x[bag[q]]
    without materialising rows (13 ms against 50 ms for gather + bmm at 1024 tokens x 128
    experts x d=256). It is private: probed once against the fallback; `force` overrides."""

    def __init__(self):
        self.ok: bool | None = None

    def available(self) -> bool:
        if self.ok is None:
            try:
                x, w = torch.randn(2, 3), torch.randn(4, 3)
                ids = torch.tensor([[1, 3], [0, 2]])
                self.ok = bool(torch.allclose(_gather_dot_private(x, ids, w),
                                              _gather_dot_chunked(x, ids, w, 64)))
            except (AttributeError, RuntimeError, NotImplementedError):
                self.ok = False
        return self.ok


PRIVATE = _PrivateOp()


def use_private_gather_dot(enabled: bool | None) -> None:
    """Force (True/False) or re-probe (None) the private aten kernel for the dot primitives."""
    PRIVATE.ok = enabled


def check_ids(ids: torch.Tensor, n: int, what: str = "expert ids") -> None:
    """IndexError unless every id lies in [0, n): checked before a kernel reads a row."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise IndexError(f"{what} must lie in [0, {n}), got [{int(ids.min())}, "
                         f"{int(ids.max())}]")


def _ragged_dot_private(x, rows, bag, offsets, w) -> torch.Tensor:
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x.contiguous(), w, rows, offsets, bag, _MODE_SUM, -1)


def _gather_dot_private(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    t, s = ids.shape
    offsets = torch.arange(0, t * s, s, device=ids.device)
    bag = torch.arange(t, device=ids.device).repeat_interleave(s)
    return _ragged_dot_private(x, ids.reshape(-1), bag, offsets, w).view(t, s)


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
    if PRIVATE.available():
        check_ids(ids, w.shape[0])  # the private op reads rows unchecked
        return _gather_dot_private(x, ids, w)
    return _gather_dot_chunked(x, ids, w, chunk_tokens)


def ragged_dot(x: torch.Tensor, rows: torch.Tensor, bag: torch.Tensor, offsets: torch.Tensor,
               w: torch.Tensor) -> torch.Tensor:
    """(Q,) w[rows[q]] . x[bag[q]]; x (P, D), rows/bag (Q,) int64, offsets (P,) bag starts."""
    if rows.numel() == 0:
        return x.new_zeros(0)
    if PRIVATE.available():
        check_ids(rows, w.shape[0], "table rows")
        return _ragged_dot_private(x, rows, bag, offsets, w)
    out = x.new_empty(rows.shape)
    for a in range(0, rows.numel(), 65536):  # bounded (chunk, D) temporaries
        r, b = rows[a:a + 65536], bag[a:a + 65536]
        out[a:a + 65536] = (w[r] * x[b]).sum(-1)
    return out


def bag_sum(ids: torch.Tensor, w: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(T, D): sum_s weights[t, s] * w[ids[t, s]]."""
    if ids.shape[1] == 0:
        return torch.zeros(ids.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
    return F.embedding_bag(ids, w, per_sample_weights=weights.to(w.dtype), mode="sum")


def ragged_bag_sum(rows: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """(P, D): per bag, sum of weights[q] * w[rows[q]]."""
    if rows.numel() == 0:
        return w.new_zeros(offsets.numel(), w.shape[1])
    return F.embedding_bag(rows, w, offsets, mode="sum", per_sample_weights=weights.to(w.dtype))


class RowGroups:
    """Selections grouped by table row, done once and reused by both table gradients.

    rows (R,) ascending unique rows, offsets (R+1,) each row's run in `order`, order (Q,) the
    selections sorted by row (stable), bag (Q,) the token (or bag) of each sorted selection.
    The C counting sort (no comparison sort, checks ids against n) where it runs, else
    torch.unique + argsort."""

    def __init__(self, rows: torch.Tensor, bag: torch.Tensor, n: int):
        flat = rows.reshape(-1)
        if flat.numel() and flat.dtype == torch.int64 and flat.device.type == "cpu" \
                and cpu.library() is not None:
            self.rows, self.offsets, self.order = cpu.group_rows(flat.contiguous(), n)
        else:
            check_ids(flat, n)
            self.rows, inverse, counts = torch.unique(flat, return_inverse=True,
                                                      return_counts=True)
            self.order = torch.argsort(inverse, stable=True)
            self.offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.bag = bag.reshape(-1)[self.order]

    @classmethod
    def of_tokens(cls, ids: torch.Tensor, n: int) -> RowGroups:
        """ids (T, S): the bag of selection (t, s) is token t."""
        t, s = ids.shape
        return cls(ids, torch.arange(t, device=ids.device).repeat_interleave(s), n)

    def sums(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(R, D): for each unique row, sum over its selections of weights * x[bag]."""
        if self.rows.numel() == 0:
            return x.new_zeros(0, x.shape[1])
        w = weights.reshape(-1)[self.order].to(x.dtype)
        return F.embedding_bag(self.bag, x, self.offsets[:-1], per_sample_weights=w,
                               mode="sum")


def row_grad(rows: torch.Tensor, rows_grad: torch.Tensor, n: int,
             sparse: bool = True) -> torch.Tensor:
    """Sorted unique rows (R,) and their gradients (R, D) -> sparse COO (or dense) (N, D)."""
    if sparse:
        return torch.sparse_coo_tensor(rows[None], rows_grad, (n, rows_grad.shape[1]),
                                       is_coalesced=True, check_invariants=False)
    dense = rows_grad.new_zeros(n, rows_grad.shape[1])
    return dense.index_copy_(0, rows, rows_grad)


def coalesced(g: torch.Tensor) -> torch.Tensor:
    """g coalesced. The kernels' row gradients hold each row once, ascending (row_grad), but
    autograd drops the coalesced flag when it stores a sparse .grad: one compare over the rows
    finds them in order and marks them, where coalesce() would sort the rows and copy every
    value (84 ms a table at N = 512^2, d = 256, 1,024 tokens of 128 selections)."""
    if g.is_coalesced():
        return g
    idx = g._indices()
    if idx.shape[1] < 2 or bool((idx[0, 1:] > idx[0, :-1]).all()):
        return torch.sparse_coo_tensor(idx, g._values(), g.shape, is_coalesced=True,
                                       check_invariants=False)
    return g.coalesce()
