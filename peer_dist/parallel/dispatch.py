"""dispatch: bring the tokens to the rows (compute at the owner).

Stages (per layer, per step), each its own autograd function or call:
  input_dist   per (token, owner) pair: x once, plus (local row, pair, gate) per selection
  compute      the owner mixes its experts with the single-device kernels (ops.ragged_mix):
               one partial d-vector per pair (a bag of that pair's selections)
  output_dist  partials go back and are summed per token
Backward runs the stages in reverse: dL/dy goes to the owners (output_dist), the owner's mix
gives dL/dx_in, dL/dgate and the U and V gradients, which never travel (compute), and the
dL/dx and dL/dgate partials come back (input_dist).

Shape legend: T = tokens, S = selections per token, D = dim, P = (token, owner) pairs this rank
sends, Q = T*S selections, P_in / Q_in = pairs / selections this owner receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peer_dist.ops import ragged_mix
from peer_dist.parallel.comm import Exchange, owner_starts, source_of_rows
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
    """dest, row, token (Q,) int64 per selection, token in [0, tokens) -> the (destination,
    token) pairs that carry one x each, and each selection's (row, pair in block) metadata."""
    key, order = torch.sort(dest * tokens + token, stable=True)
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


class SendTokens(torch.autograd.Function):
    """input_dist: (x (T, D), gates (T, S)) -> at the owners x_in (P_in, D), gates_in (Q_in,),
    rows (Q_in,) local rows and bag (Q_in,) the received pair of each selection.

    Gates travel in x's dtype, as bytes beside the int32 (local row, pair) of their selection:
    one message. Backward returns dL/dx partials (summed per token) and dL/dgate."""

    @staticmethod
    def forward(ctx, x, gates, plan: DispatchPlan, ex: Exchange):
        gate_cols = _as_int32_columns(gates.reshape(-1)[plan.order].to(x.dtype))
        meta = torch.cat([plan.meta, gate_cols], 1)  # (Q, 2 + gate words) int32
        x_in = ex.send(x[plan.pair_token], plan.pair_splits, plan.recv_pairs, "fwd")
        meta_in = ex.send(meta, plan.sel_splits, plan.recv_sels, "fwd")
        rows = meta_in[:, 0].to(torch.int64)
        bag = meta_in[:, 1].to(torch.int64) + owner_starts(plan.recv_pairs, x.device)[
            source_of_rows(plan.recv_sels, x.device)]  # nondecreasing: pairs by source
        g_in = _from_int32_columns(meta_in[:, 2:], x.dtype)
        ctx.plan, ctx.ex, ctx.shapes = plan, ex, (x.shape, gates.shape)
        ctx.mark_non_differentiable(rows, bag)
        return x_in, g_in, rows, bag

    @staticmethod
    def backward(ctx, dx_in, dg_in, _rows, _bag):
        plan, ex = ctx.plan, ctx.ex
        x_shape, g_shape = ctx.shapes
        dx_pairs = ex.send(dx_in, plan.recv_pairs, plan.pair_splits, "bwd")  # (P, D)
        dg = ex.send(dg_in.contiguous(), plan.recv_sels, plan.sel_splits, "bwd")  # (Q,)
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

    def __init__(self, idmap: IdMap, ex: Exchange, act: str):
        self.idmap, self.ex, self.act = idmap, ex, act

    def input_dist(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> Received:
        plan = plan_dispatch(ids, self.idmap, self.ex)
        x_in, g_in, rows, bag = SendTokens.apply(x, gates, plan, self.ex)
        return Received(x_in, rows, bag, g_in, plan)

    def compute(self, got: Received, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(P_in, D) one partial per received pair, from the local rows only."""
        return ragged_mix(got.x, got.rows, got.bag, got.gates, u, v, self.act)

    def output_dist(self, got: Received, y_in: torch.Tensor, tokens: int) -> torch.Tensor:
        return ReturnPartials.apply(y_in, got.plan, self.ex, tokens)
