"""dispatch: bring the tokens to the rows (compute at the owner).

Stages (per layer, per step), each its own autograd function or call:
  input_dist   per (token, owner) pair: x once, plus (local row, pair, gate) per selection
  compute      the owner mixes its experts with the single-device kernels (ops.ragged_mix):
               one partial d-vector per pair (a bag of that pair's selections)
  output_dist  partials go back and are summed per token
Backward runs the stages in reverse: dL/dy goes to the owners (output_dist), the owner's mix
gives dL/dx_in, dL/dgate and the U and V gradients, which never travel (compute), and the
dL/dx and dL/dgate partials come back (input_dist).

Overlap (parallel.overlap_chunks = C > 1): the tokens are cut into C chunks, planned at once
(one count exchange for all), and one autograd function pipelines them: chunk i+1's tokens
travel while the owner mixes chunk i, the partials go back while the next chunk mixes; backward
the same with dL/dy out and dL/dx, dL/dgate back. Only the time spent waiting on a transfer is
exposed; stats.stage_seconds["comm_wait"] counts it.

Shape legend: T = tokens, S = selections per token, D = dim, P = (token, owner) pairs this rank
sends, Q = T*S selections, P_in / Q_in = pairs / selections this owner receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peer_dist.ops import cpu, ragged_mix
from peer_dist.ops.rows import coalesced
from peer_dist.parallel.comm import (
    Exchange,
    owner_starts,
    send_async,
    send_two_async,
    source_of_rows,
)
from peer_dist.parallel.idmap import IdMap


@dataclass
class DispatchPlan:
    order: torch.Tensor  # (Q,) selections sorted by (owner, token)
    pair_token: torch.Tensor  # (P,) token of each pair, pairs sorted by (owner, token)
    meta: torch.Tensor  # (Q, 2) int32 (local row, pair index within its owner's block)
    pair_splits: list[int]  # pairs sent to each owner
    sel_splits: list[int]  # selections sent to each owner
    recv_pairs: list[int]  # pairs received from each rank
    recv_sels: list[int]  # selections received from each rank


@dataclass
class Received:
    """What an owner holds after input_dist: its bags of selections, one per received pair."""

    x: torch.Tensor  # (P_in, D) one token row per pair
    rows: torch.Tensor  # (Q_in,) int64 local rows
    bag: torch.Tensor  # (Q_in,) int64 pair of each selection, nondecreasing
    gates: torch.Tensor  # (Q_in,) in x's dtype
    plan: DispatchPlan


@dataclass
class Grouping:
    """Selections grouped by (destination, token): what a DispatchPlan needs besides splits."""

    order: torch.Tensor  # (Q,) selections sorted by (destination, token)
    pair_token: torch.Tensor  # (P,) token of each pair
    meta: torch.Tensor  # (Q, 2) int32 (row at the destination, pair index within its block)
    pair_count: torch.Tensor  # (W,) pairs per destination
    sel_count: torch.Tensor  # (W,) selections per destination


def group_pairs(dest: torch.Tensor, row: torch.Tensor, token: torch.Tensor, tokens: int,
                size: int) -> Grouping:
    """dest, row, token (Q,) int64 per selection, token in [0, tokens) and nondecreasing (every
    caller's selections are token-major) -> the (destination, token) pairs that carry one x
    each, and each selection's (row, pair in block) metadata. A stable sort by destination
    alone keeps each destination's tokens in order: 1.6 ms against 5.0 ms for the (destination,
    token) key at 131,072 selections on one core."""
    if token.numel() > 1 and bool((token[1:] < token[:-1]).any()):
        raise ValueError("group_pairs: token must be nondecreasing (selections token-major)")
    _, order = torch.sort(dest, stable=True)
    key = (dest * tokens + token)[order]
    pair_key, sel_pair = torch.unique_consecutive(key, return_inverse=True)
    pair_dest = torch.div(pair_key, tokens, rounding_mode="floor")
    pair_count = torch.bincount(pair_dest, minlength=size)
    first_pair = torch.cumsum(pair_count, 0) - pair_count
    in_block = sel_pair - first_pair[dest[order]]
    meta = torch.stack([row[order], in_block], 1).to(torch.int32)
    return Grouping(order, pair_key - pair_dest * tokens, meta, pair_count,
                    torch.bincount(dest, minlength=size))


def plan_dispatch(ids: torch.Tensor, idmap: IdMap, ex: Exchange) -> DispatchPlan:
    """Group selections by (owner, token) and exchange the counts (the one host sync)."""
    t, s = ids.shape
    owner, local = idmap.split(idmap.position(ids.reshape(-1)))  # (Q,)
    token = torch.arange(t, device=ids.device).repeat_interleave(s)
    g = group_pairs(owner, local, token, t, ex.size)
    sent, recv = ex.counts(torch.stack([g.pair_count, g.sel_count], 1))
    return DispatchPlan(g.order, g.pair_token, g.meta, [c[0] for c in sent],
                        [c[1] for c in sent], [c[0] for c in recv], [c[1] for c in recv])


def _as_int32_columns(t: torch.Tensor) -> torch.Tensor:
    """(Q,) floats -> (Q, ceil(bytes / 4)) int32 holding their bytes (zero-padded)."""
    b = t.contiguous().view(torch.uint8).view(t.shape[0], t.element_size())
    pad = -t.element_size() % 4
    if pad:
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
    return b.view(torch.int32)


def _from_int32_columns(cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    elem = torch.empty(0, dtype=dtype).element_size()
    return cols.contiguous().view(torch.uint8)[:, :elem].contiguous().view(dtype).view(-1)


def _selection_meta(gates: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype) -> torch.Tensor:
    """(Q, 2 + gate words) int32 per selection sent: (local row, pair) and the gate's bytes in
    x's dtype, in the plan's order."""
    return torch.cat([plan.meta, _as_int32_columns(gates.reshape(-1)[plan.order].to(dtype))], 1)


def unpack(x_in: torch.Tensor, meta_in: torch.Tensor, plan: DispatchPlan) -> Received:
    """What an input_dist message delivered: x per pair, and each selection's local row, bag
    (its received pair, nondecreasing: pairs by source) and gate (bytes beside the metadata)."""
    bag = meta_in[:, 1].to(torch.int64) + owner_starts(plan.recv_pairs, x_in.device)[
        source_of_rows(plan.recv_sels, x_in.device)]
    return Received(x_in, meta_in[:, 0].to(torch.int64), bag,
                    _from_int32_columns(meta_in[:, 2:], x_in.dtype), plan)


class SendTokens(torch.autograd.Function):
    """input_dist: (x (T, D), gates (T, S)) -> at the owners x_in (P_in, D), gates_in (Q_in,),
    rows (Q_in,) local rows and bag (Q_in,) the received pair of each selection.

    Gates travel in x's dtype, as bytes beside the int32 (local row, pair) of their selection:
    one message. Backward returns dL/dx partials (summed per token) and dL/dgate."""

    @staticmethod
    def forward(ctx, x, gates, plan: DispatchPlan, ex: Exchange):
        x_in, meta_in = ex.send_two(x[plan.pair_token], plan.pair_splits, plan.recv_pairs,
                                    _selection_meta(gates, plan, x.dtype), plan.sel_splits,
                                    plan.recv_sels, "fwd")
        got = unpack(x_in, meta_in, plan)
        ctx.plan, ctx.ex, ctx.shapes = plan, ex, (x.shape, gates.shape)
        ctx.mark_non_differentiable(got.rows, got.bag)
        return x_in, got.gates, got.rows, got.bag

    @staticmethod
    def backward(ctx, dx_in, dg_in, _rows, _bag):
        plan, ex = ctx.plan, ctx.ex
        x_shape, g_shape = ctx.shapes
        dx_pairs, dg = ex.send_two(dx_in, plan.recv_pairs, plan.pair_splits,  # (P, D), (Q,)
                                   dg_in.contiguous(), plan.recv_sels, plan.sel_splits, "bwd")
        dx = dx_pairs.new_zeros(x_shape).index_add_(0, plan.pair_token, dx_pairs)
        dgates = dg.new_zeros(dg.shape).index_copy_(0, plan.order, dg)
        return dx, dgates.view(g_shape), None, None


class ReturnPartials(torch.autograd.Function):
    """output_dist: partial y (P_in, D) at the owners -> y (T, D), summed per token.
    Backward sends dL/dy to the owners, once per pair."""

    @staticmethod
    def forward(ctx, y_in, plan: DispatchPlan, ex: Exchange, tokens: int):
        ctx.plan, ctx.ex = plan, ex
        y_pairs = ex.send(y_in, plan.recv_pairs, plan.pair_splits, "fwd")  # (P, D)
        return y_pairs.new_zeros(tokens, y_in.shape[1]).index_add_(0, plan.pair_token, y_pairs)

    @staticmethod
    def backward(ctx, dy):
        plan = ctx.plan
        dy_in = ctx.ex.send(dy.contiguous()[plan.pair_token], plan.pair_splits, plan.recv_pairs,
                            "bwd")  # (P_in, D)
        return dy_in, None, None, None


class Dispatch:
    """The dispatch strategy's three stages for one EP group."""

    name = "dispatch"
    overlaps = True  # has overlapped(): parallel.overlap_chunks > 1 pipelines it

    def __init__(self, idmap: IdMap, ex: Exchange, act: str, table_scale: float = 1.0):
        self.idmap, self.ex, self.act, self.table_scale = idmap, ex, act, table_scale

    def input_dist(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> Received:
        plan = plan_dispatch(ids, self.idmap, self.ex)
        x_in, g_in, rows, bag = SendTokens.apply(x, gates, plan, self.ex)
        return Received(x_in, rows, bag, g_in, plan)

    def compute(self, got: Received, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(P_in, D) one partial per received pair, from the local rows only."""
        return ragged_mix(got.x, got.rows, got.bag, got.gates, u, v, self.act,
                          table_scale=self.table_scale)

    def output_dist(self, got: Received, y_in: torch.Tensor, tokens: int) -> torch.Tensor:
        return ReturnPartials.apply(y_in, got.plan, self.ex, tokens)

    def overlapped(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                   u: torch.Tensor, v: torch.Tensor, chunks: int) -> torch.Tensor:
        """All three stages over `chunks` chunks of tokens, transfers under compute."""
        bounds = chunk_bounds(x.shape[0], chunks)
        plans = plan_chunks(ids, self.idmap, self.ex, bounds)
        return OverlappedDispatch.apply(x, gates, u, v, plans, bounds, self.ex, self.act,
                                        self.table_scale)


def chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """C contiguous token ranges, as equal as possible (the last ones empty when T < C)."""
    step = -(-tokens // chunks)
    return [(min(i * step, tokens), min((i + 1) * step, tokens)) for i in range(chunks)]


def plan_chunks(ids: torch.Tensor, idmap: IdMap, ex: Exchange,
                bounds: list[tuple[int, int]]) -> list[DispatchPlan]:
    """A DispatchPlan per chunk of tokens; one count exchange for all of them (W, 2C)."""
    s = ids.shape[1]
    groups = []
    for a, b in bounds:
        owner, local = idmap.split(idmap.position(ids[a:b].reshape(-1)))
        token = torch.arange(b - a, device=ids.device).repeat_interleave(s)
        groups.append(group_pairs(owner, local, token, b - a, ex.size))
    sent, recv = ex.counts(torch.cat([torch.stack([g.pair_count, g.sel_count], 1)
                                      for g in groups], 1))
    return [DispatchPlan(g.order, g.pair_token, g.meta, [c[2 * i] for c in sent],
                         [c[2 * i + 1] for c in sent], [c[2 * i] for c in recv],
                         [c[2 * i + 1] for c in recv]) for i, g in enumerate(groups)]


@dataclass
class ChunkMix:
    """One chunk at its owner: the received x and gates (leaves) and the partials' graph."""

    x: torch.Tensor  # (P_in, D)
    gates: torch.Tensor  # (Q_in,)
    y: torch.Tensor  # (P_in, D)


def _send_chunk(x, gates, plan: DispatchPlan, start: int, ex: Exchange):
    """input_dist of one chunk, in flight: x per pair, and (row, pair, gate) per selection,
    in one all-to-all (wait() gives both)."""
    return send_two_async(ex, x[plan.pair_token + start], plan.pair_splits, plan.recv_pairs,
                          _selection_meta(gates, plan, x.dtype), plan.sel_splits,
                          plan.recv_sels, "fwd")


def _mix_chunk(x_in, meta_in, plan: DispatchPlan, u, v, act: str,
               table_scale: float) -> ChunkMix:
    """compute of one chunk, with its own graph (differentiated in backward)."""
    got = unpack(x_in, meta_in, plan)
    with torch.enable_grad():
        x_in, g_in = x_in.requires_grad_(True), got.gates.requires_grad_(True)
        return ChunkMix(x_in, g_in, ragged_mix(x_in, got.rows, got.bag, g_in, u, v, act,
                                               table_scale=table_scale))


class OverlappedDispatch(torch.autograd.Function):
    """(x (T, D), gates (T, S), u, v) -> y (T, D), the chunks' transfers under their compute."""

    @staticmethod
    def forward(ctx, x, gates, u, v, plans, bounds, ex: Exchange, act: str,
                table_scale: float):
        pending = _send_chunk(x, gates[slice(*bounds[0])], plans[0], bounds[0][0], ex)
        mixes, back = [], []
        for i, plan in enumerate(plans):
            x_in, meta_in = pending.wait()
            if i + 1 < len(plans):  # the next chunk travels while this one mixes
                a = bounds[i + 1][0]
                pending = _send_chunk(x, gates[slice(*bounds[i + 1])], plans[i + 1], a, ex)
            mixes.append(_mix_chunk(x_in, meta_in, plan, u, v, act, table_scale))
            back.append(send_async(ex, mixes[-1].y.detach(), plan.recv_pairs, plan.pair_splits,
                                   "fwd"))
        y = x.new_zeros(x.shape)
        for (a, _), plan, p in zip(bounds, plans, back, strict=True):
            y.index_add_(0, plan.pair_token + a, p.wait())
        ctx.mixes, ctx.plans, ctx.bounds, ctx.ex, ctx.tables = mixes, plans, bounds, ex, (u, v)
        ctx.g_shape = gates.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        dy, plans, bounds, ex = dy.contiguous(), ctx.plans, ctx.bounds, ctx.ex
        send_dy = lambda i: send_async(ex, dy[plans[i].pair_token + bounds[i][0]],  # noqa: E731
                                       plans[i].pair_splits, plans[i].recv_pairs, "bwd")
        pending, back, tables = send_dy(0), [], ([], [])  # U, V gradients of each chunk
        for i, (mix, plan) in enumerate(zip(ctx.mixes, plans, strict=True)):
            dy_in = pending.wait()
            if i + 1 < len(plans):
                pending = send_dy(i + 1)
            grads = torch.autograd.grad(mix.y, [mix.x, mix.gates, *ctx.tables], dy_in,
                                        allow_unused=True)
            gx, gg = (g if g is not None else torch.zeros_like(t)
                      for g, t in zip(grads[:2], (mix.x, mix.gates), strict=True))
            back.append(send_two_async(ex, gx, plan.recv_pairs, plan.pair_splits,
                                       gg.contiguous(), plan.recv_sels, plan.sel_splits, "bwd"))
            for parts, g in zip(tables, grads[2:], strict=True):
                if g is not None:
                    parts.append(g)
        dx = dy.new_zeros(dy.shape)
        dgates = dy.new_zeros(ctx.g_shape)
        for (a, b), plan, p in zip(bounds, plans, back, strict=True):
            pdx, dg = p.wait()
            dx.index_add_(0, plan.pair_token + a, pdx)
            dgates[a:b] = dg.new_zeros(dg.shape).index_copy_(0, plan.order, dg).view(
                b - a, dgates.shape[1])
        return dx, dgates, *(sum_chunk_grads(p) for p in tables), None, None, None, None, None


def sum_chunk_grads(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The chunks' row-sparse table gradients summed into one coalesced COO tensor: the union
    of their rows (each chunk's rows unique and ascending, as the kernels give them), each
    chunk's values added at its rows' places in one buffer. Concatenating them for the gradient
    sync to coalesce copied every value twice into new memory (about 300 ms of a 590 ms
    two-chunk step at N = 512^2, d = 256, 1,024 tokens of 128 selections on one core)."""
    if not parts or not all(p.is_sparse for p in parts):
        return sum(parts[1:], parts[0]) if parts else None
    if len(parts) == 1:
        return parts[0]
    parts = [coalesced(p) for p in parts]
    rows, where = torch.unique(torch.cat([p._indices()[0] for p in parts]), return_inverse=True)
    vals = parts[0]._values()
    out = (cpu.pool.take(rows.numel(), vals.shape[1], dtype=vals.dtype)
           if vals.device.type == "cpu" else vals.new_empty(rows.numel(), vals.shape[1]))
    out.zero_()
    start = 0
    for p in parts:
        n = p._nnz()
        out.index_add_(0, where[start:start + n], p._values())
        start += n
    return torch.sparse_coo_tensor(rows[None], out, parts[0].shape, is_coalesced=True,
                                   check_invariants=False)
