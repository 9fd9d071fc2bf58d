"""dispatch: bring the tokens to the rows (compute at the owner).

Stages (per layer, per step):
  input_dist   per (token, owner) pair: x once, plus (local id, pair, gate) per selection
  compute      the owner mixes its experts: one partial d-vector per pair (ragged bags)
  output_dist  partials go back and are summed per token
Backward: dL/dy goes to the owners; dL/dx and dL/dgate partials come back; the U and V
gradients arise at the owner and never travel.

Shape legend: T = tokens, S = selections per token, D = dim, P = (token, owner) pairs this rank
sends, Q = T*S selections, P_in / Q_in = pairs / selections this owner receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peer_dist.ops import activation, activation_grad
from peer_dist.ops.rows import RowGroups, ragged_bag_sum, ragged_dot, row_grad
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


def plan_dispatch(ids: torch.Tensor, idmap: IdMap, ex: Exchange) -> DispatchPlan:
    """Group selections by (owner, token) and exchange the counts (the one host sync)."""
    t, s = ids.shape
    owner, local = idmap.split(idmap.position(ids.reshape(-1)))  # (Q,)
    token = torch.arange(t, device=ids.device).repeat_interleave(s)
    key, order = torch.sort(owner * t + token, stable=True)
    pair_key, sel_pair = torch.unique_consecutive(key, return_inverse=True)
    pair_owner = torch.div(pair_key, t, rounding_mode="floor")
    pair_count = torch.bincount(pair_owner, minlength=ex.size)
    sel_count = torch.bincount(owner, minlength=ex.size)
    first_pair = torch.cumsum(pair_count, 0) - pair_count
    in_block = sel_pair - first_pair[owner[order]]
    meta = torch.stack([local[order], in_block], 1).to(torch.int32)
    sent, recv = ex.counts(torch.stack([pair_count, sel_count], 1))
    return DispatchPlan(order, pair_key - pair_owner * t, meta, [c[0] for c in sent],
                        [c[1] for c in sent], [c[0] for c in recv], [c[1] for c in recv])


def dispatch_counts_out(ids: torch.Tensor, idmap: IdMap, me: int) -> tuple[int, int]:
    """(pairs, selections) this rank would send to other owners (for the cost model)."""
    t, s = ids.shape
    owner, _ = idmap.split(idmap.position(ids.reshape(-1)))
    token = torch.arange(t, device=ids.device).repeat_interleave(s)
    remote = owner != me
    pairs = torch.unique(owner[remote] * t + token[remote]).numel()
    return pairs, int(remote.sum())


def _row_grad(rows: torch.Tensor, bag: torch.Tensor, xs: torch.Tensor, weights: torch.Tensor,
              n: int) -> torch.Tensor:
    """Sparse (n, D) COO: for each distinct row, sum over its selections of weights * xs[bag]."""
    groups = RowGroups(rows, bag, n)
    return row_grad(groups.rows, groups.sums(xs, weights), n)


class Dispatch(torch.autograd.Function):
    """(x, gates, u, v) -> y (T, D); u, v are the local shard; collective over the EP group."""

    @staticmethod
    def forward(ctx, x, gates, u, v, plan: DispatchPlan, ex: Exchange, act: str):
        # input_dist: x once per pair; (local row, pair, gate bits) per selection
        gate_bits = gates.reshape(-1)[plan.order].float().view(torch.int32)[:, None]
        meta = torch.cat([plan.meta, gate_bits], 1)  # (Q, 3) int32
        x_in = ex.send(x[plan.pair_token], plan.pair_splits, plan.recv_pairs, "fwd")  # (P_in, D)
        meta_in = ex.send(meta, plan.sel_splits, plan.recv_sels, "fwd").to(torch.int64)
        rows = meta_in[:, 0].contiguous()
        g_in = meta_in[:, 2].to(torch.int32).view(torch.float32)
        bag = meta_in[:, 1] + owner_starts(plan.recv_pairs, x.device)[
            source_of_rows(plan.recv_sels, x.device)]  # (Q_in,) nondecreasing
        offsets = torch.cumsum(torch.bincount(bag, minlength=x_in.shape[0]), 0)
        offsets = offsets - torch.bincount(bag, minlength=x_in.shape[0])
        # compute: one partial per pair
        g_in = g_in.to(x.dtype)
        s = ragged_dot(x_in, rows, bag, offsets, u)  # (Q_in,) pre-activations
        y_in = ragged_bag_sum(rows, offsets, v, g_in * activation(act, s))  # (P_in, D)
        # output_dist: partials back, summed per token
        y_pairs = ex.send(y_in, plan.recv_pairs, plan.pair_splits, "fwd")  # (P, D)
        y = x.new_zeros(x.shape).index_add_(0, plan.pair_token, y_pairs)
        ctx.save_for_backward(x_in, rows, bag, offsets, g_in, s, u, v)
        ctx.plan, ctx.ex, ctx.act, ctx.gshape = plan, ex, act, gates.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x_in, rows, bag, offsets, g_in, s, u, v = ctx.saved_tensors
        plan, ex, act = ctx.plan, ctx.ex, ctx.act
        dy_in = ex.send(dy.contiguous()[plan.pair_token], plan.pair_splits, plan.recv_pairs,
                        "bwd")  # (P_in, D)
        a = activation(act, s)
        dw = ragged_dot(dy_in, rows, bag, offsets, v)  # (Q_in,) dL/d(weight)
        ds = dw * g_in * activation_grad(act, s)  # (Q_in,) dL/ds
        dx_in = ragged_bag_sum(rows, offsets, u, ds)  # (P_in, D)
        du = _row_grad(rows, bag, x_in, ds, u.shape[0])  # U, V grads stay here
        dv = _row_grad(rows, bag, dy_in, g_in * a, v.shape[0])
        dx_pairs = ex.send(dx_in, plan.recv_pairs, plan.pair_splits, "bwd")  # (P, D)
        dg = ex.send((dw * a).float(), plan.recv_sels, plan.sel_splits, "bwd")  # (Q,)
        dx = dx_pairs.new_zeros(dy.shape).index_add_(0, plan.pair_token, dx_pairs)
        dgates = dg.new_zeros(dg.shape).index_copy_(0, plan.order, dg)
        return dx, dgates.view(ctx.gshape).to(dy.dtype), du, dv, None, None, None


def dispatch_mix(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, u: torch.Tensor,
                 v: torch.Tensor, idmap: IdMap, ex: Exchange, act: str) -> torch.Tensor:
    """x (T, D), ids (T, S) global expert ids, gates (T, S) -> y (T, D)."""
    plan = plan_dispatch(ids, idmap, ex)
    return Dispatch.apply(x, gates, u, v, plan, ex, act)
