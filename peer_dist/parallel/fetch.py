"""fetch: bring the selected rows to the tokens.

Stages (per layer, per step), each its own call or autograd function:
  input_dist   distinct selected ids -> owners (counts, then int32 local ids)
  compute      each owner looks up the U and V rows asked of it
  output_dist  the rows go back and the requester mixes them with its tokens (ops.peer_mix)
Backward: the rows' gradients go back to their owners (output_dist), which keep them as sparse
gradients of the shard (compute).

Overlap (parallel.overlap_chunks = C > 1): the distinct rows a rank asks of each owner are cut
into C chunks (chunk i: the i-th C-th of every owner's block, so each all-to-all stays
balanced), planned at once (one (W, C) count exchange, one id exchange). One autograd function
pipelines them: chunk i+1's rows travel while the selections whose rows are in chunk i mix
(a ragged mix, bag = token, each chunk a partial y summed over chunks); backward, chunk i's row
gradients travel back while chunk i+1's backward mix runs. Rows are cut, not tokens: a row is
fetched once, as without chunks (cutting tokens would fetch a row once per chunk that selects
it), so the bytes are the unchunked ones plus (C - 1) count columns. Only the time spent
waiting on a transfer is exposed; stats.stage_seconds["comm_wait"] counts it.

Shape legend: T = tokens, S = selections per token, D = dim, R = distinct rows this rank
selected, R_in = rows other ranks (and this one) asked of this owner, C = chunks, Q_i /
R_i / R_in_i = selections / rows / served rows of chunk i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peer_dist.ops import peer_mix, ragged_mix
from peer_dist.parallel.comm import Exchange, send_async
from peer_dist.parallel.idmap import IdMap


@dataclass
class FetchPlan:
    send_splits: list[int]  # rows this rank asks of each owner
    recv_splits: list[int]  # rows each rank asks of this owner
    served: torch.Tensor  # (R_in,) int64 local rows this owner serves, by requester
    mix_ids: torch.Tensor  # (T, S) int64 index into the fetched (R, D) rows


def plan_fetch(ids: torch.Tensor, idmap: IdMap, ex: Exchange) -> FetchPlan:
    """Deduplicate ids, group them by owner, exchange counts and local ids (one host sync)."""
    uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)  # (R,), (T*S,)
    pos, order = idmap.position(uniq).sort()  # owner-major order (owner = pos // b)
    owner, local = idmap.split(pos)
    sent, recv = ex.counts(torch.bincount(owner, minlength=ex.size)[:, None])
    send_splits, recv_splits = [c[0] for c in sent], [c[0] for c in recv]
    served = ex.send(local.to(torch.int32), send_splits, recv_splits, "fwd").to(torch.int64)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel(), device=order.device)  # uniq j -> fetched row
    return FetchPlan(send_splits, recv_splits, served, where[inverse].view(ids.shape))


class LookupRows(torch.autograd.Function):
    """compute: the owner's lookup (u, v) shard -> the rows it serves (R_in, D) each.
    Backward: the served rows' gradients as sparse COO gradients of the shard (a row served
    to several ranks appears once per request; coalescing sums them)."""

    @staticmethod
    def forward(ctx, u, v, served: torch.Tensor):
        ctx.save_for_backward(served)
        ctx.shape = u.shape
        return u[served], v[served]

    @staticmethod
    def backward(ctx, gu, gv):
        (served,) = ctx.saved_tensors
        return (*(torch.sparse_coo_tensor(served[None], g.contiguous(), ctx.shape,
                                          check_invariants=False) for g in (gu, gv)), None)


class ReturnRows(torch.autograd.Function):
    """output_dist: served rows (R_in, D) -> the requester's rows (R, D), U and V as two
    messages (no (R, 2D) concatenation and split copies). Backward sends the rows' gradients
    back to their owners."""

    @staticmethod
    def forward(ctx, u_served, v_served, plan: FetchPlan, ex: Exchange):
        ctx.plan, ctx.ex = plan, ex
        return tuple(ex.send(t, plan.recv_splits, plan.send_splits, "fwd")
                     for t in (u_served, v_served))

    @staticmethod
    def backward(ctx, gu, gv):
        plan, ex = ctx.plan, ctx.ex
        return (*(ex.send(g.contiguous(), plan.send_splits, plan.recv_splits, "bwd")
                  for g in (gu, gv)), None, None)


@dataclass
class Requested:
    """What input_dist leaves: the plan, and x and gates, which stay at the requester."""

    plan: FetchPlan
    x: torch.Tensor
    gates: torch.Tensor


class Fetch:
    """The fetch strategy's three stages for one EP group."""

    name = "fetch"
    overlaps = True  # has overlapped(): parallel.overlap_chunks > 1 pipelines it

    def __init__(self, idmap: IdMap, ex: Exchange, act: str, table_scale: float = 1.0):
        self.idmap, self.ex, self.act, self.table_scale = idmap, ex, act, table_scale

    def input_dist(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> Requested:
        return Requested(plan_fetch(ids, self.idmap, self.ex), x, gates)

    def compute(self, req: Requested, u: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return LookupRows.apply(u, v, req.plan.served)

    def output_dist(self, req: Requested, served: tuple[torch.Tensor, torch.Tensor],
                    tokens: int) -> torch.Tensor:
        """Rows back to the requester, which mixes them with its tokens: y (T, D)."""
        u_rows, v_rows = ReturnRows.apply(*served, req.plan, self.ex)
        return peer_mix(req.x, req.plan.mix_ids, req.gates, u_rows, v_rows, self.act,
                        sparse_grad=False, table_scale=self.table_scale)

    def overlapped(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                   u: torch.Tensor, v: torch.Tensor, chunks: int) -> torch.Tensor:
        """All three stages over `chunks` chunks of the requested rows, transfers under the
        mix: y (T, D)."""
        plan = plan_fetch_chunks(ids, self.idmap, self.ex, chunks)
        return OverlappedFetch.apply(x, gates, u, v, plan, self.ex, self.act, self.table_scale)


@dataclass
class ChunkedFetchPlan:
    send_splits: list[list[int]]  # [chunk][owner] rows this rank asks of each owner
    recv_splits: list[list[int]]  # [chunk][requester] rows each rank asks of this owner
    served: list[torch.Tensor]  # [chunk] (R_in_i,) int64 local rows served, by requester
    sel: list[torch.Tensor]  # [chunk] (Q_i,) flat selections (t * S + j), ascending
    mix_rows: list[torch.Tensor]  # [chunk] (Q_i,) int64 index into chunk i's fetched rows
    per_token: int  # S


def _row_chunks(owner: torch.Tensor, size: int, chunks: int):
    """owner (R,) sorted -> each row's chunk (R,), its index in its chunk's buffer (R,), and
    the counts (W, C). Chunk i of owner o's n_o rows: positions [i*step, (i+1)*step),
    step = max(1, ceil(n_o / C)) (chunk_bounds' cut); a chunk's buffer is owner-major."""
    per_owner = torch.bincount(owner, minlength=size)  # (W,)
    k = torch.arange(owner.numel(), device=owner.device) - (
        torch.cumsum(per_owner, 0) - per_owner)[owner]  # position within the owner's block
    step = torch.clamp((per_owner + chunks - 1) // chunks, min=1)[owner]
    chunk = torch.div(k, step, rounding_mode="floor")
    counts = torch.bincount(owner * chunks + chunk, minlength=size * chunks).view(size, chunks)
    before = (torch.cumsum(counts, 0) - counts).t()  # (C, W) rows of earlier owners per chunk
    return chunk, before[chunk, owner] + k - chunk * step, counts


def plan_fetch_chunks(ids: torch.Tensor, idmap: IdMap, ex: Exchange,
                      chunks: int) -> ChunkedFetchPlan:
    """plan_fetch with the rows cut into chunks: one (W, C) count exchange (the host sync)
    and one exchange of all the local ids."""
    uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)  # (R,), (T*S,)
    pos, order = idmap.position(uniq).sort()  # owner-major, then by position
    owner, local = idmap.split(pos)
    chunk, slot, counts = _row_chunks(owner, ex.size, chunks)
    sent, recv = ex.counts(counts)  # (W, C) each
    served = ex.send(local.to(torch.int32), [sum(c) for c in sent], [sum(c) for c in recv],
                     "fwd").to(torch.int64)  # (R_in,) by requester, then chunk
    served_chunk = torch.cat([torch.repeat_interleave(torch.arange(chunks), torch.tensor(
        c, dtype=torch.int64)) for c in recv]).to(served.device)  # (R_in,)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel(), device=order.device)  # uniq j -> sorted row
    row = where[inverse]  # (T*S,) each selection's sorted row
    sel_chunk, sel_slot = chunk[row], slot[row]
    sel = [(sel_chunk == i).nonzero().squeeze(1) for i in range(chunks)]
    return ChunkedFetchPlan([[c[i] for c in sent] for i in range(chunks)],
                            [[c[i] for c in recv] for i in range(chunks)],
                            [served[served_chunk == i] for i in range(chunks)], sel,
                            [sel_slot[s] for s in sel], ids.shape[1])


@dataclass
class RowMix:
    """One chunk's mix at the requester: its leaves and its partial y's graph (None when the
    chunk selected nothing here)."""

    x: torch.Tensor  # (T, D)
    gates: torch.Tensor  # (Q_i,)
    u: torch.Tensor  # (R_i, D) fetched rows
    v: torch.Tensor
    y: torch.Tensor | None  # (T, D)


def _serve_chunk(u, v, plan: ChunkedFetchPlan, i: int, ex: Exchange):
    """compute + output_dist of chunk i, in flight: the owner's rows to their requesters."""
    return [send_async(ex, t[plan.served[i]], plan.recv_splits[i], plan.send_splits[i], "fwd")
            for t in (u, v)]


def _mix_rows(x, gates, rows: list[torch.Tensor], plan: ChunkedFetchPlan, i: int,
              act: str, table_scale: float) -> RowMix:
    """The selections whose rows are in chunk i, mixed into a partial y (own graph)."""
    sel = plan.sel[i]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True)
                  for t in (x, gates.reshape(-1)[sel].to(x.dtype), *rows)]
        y = None
        if sel.numel():
            bag = torch.div(sel, plan.per_token, rounding_mode="floor")  # token, nondecreasing
            y = ragged_mix(leaves[0], plan.mix_rows[i], bag, leaves[1], leaves[2], leaves[3],
                           act, sparse_grad=False, table_scale=table_scale)
        return RowMix(*leaves, y)


class OverlappedFetch(torch.autograd.Function):
    """(x (T, D), gates (T, S), u, v) -> y (T, D), each chunk's rows travelling under the
    previous chunk's mix; backward, each chunk's row gradients under the next one's."""

    @staticmethod
    def forward(ctx, x, gates, u, v, plan: ChunkedFetchPlan, ex: Exchange, act: str,
                table_scale: float):
        chunks = len(plan.sel)
        pending, mixes = _serve_chunk(u, v, plan, 0, ex), []
        y = x.new_zeros(x.shape)
        for i in range(chunks):
            rows = [p.wait() for p in pending]
            if i + 1 < chunks:  # the next chunk's rows travel while this one mixes
                pending = _serve_chunk(u, v, plan, i + 1, ex)
            mixes.append(_mix_rows(x, gates, rows, plan, i, act, table_scale))
            if mixes[-1].y is not None:
                y += mixes[-1].y.detach()
        ctx.mixes, ctx.plan, ctx.ex = mixes, plan, ex
        ctx.shapes, ctx.g_dtype = (gates.shape, u.shape), gates.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        plan, ex, (g_shape, t_shape) = ctx.plan, ctx.ex, ctx.shapes
        dx = dy.new_zeros(dy.shape)
        dgates = dy.new_zeros(g_shape, dtype=ctx.g_dtype).view(-1)
        back = []
        for i, mix in enumerate(ctx.mixes):
            grads = [None] * 4
            if mix.y is not None:
                grads = torch.autograd.grad(mix.y, [mix.x, mix.gates, mix.u, mix.v], dy,
                                            allow_unused=True)
            gx, gg, gu, gv = (g if g is not None else torch.zeros_like(t) for g, t in
                              zip(grads, (mix.x, mix.gates, mix.u, mix.v), strict=True))
            # chunk i's row gradients go home while chunk i+1's backward mix runs
            back.append([send_async(ex, g.contiguous(), plan.send_splits[i],
                                    plan.recv_splits[i], "bwd") for g in (gu, gv)])
            dx += gx
            dgates[plan.sel[i]] = gg.to(dgates.dtype)
        rows = torch.cat(plan.served)[None]  # (1, R_in) every chunk's served rows, in order
        du, dv = (torch.sparse_coo_tensor(rows, torch.cat([b[j].wait() for b in back]), t_shape,
                                          check_invariants=False) for j in (0, 1))
        return dx, dgates.view(g_shape), du, dv, None, None, None, None
