"""fetch: bring the selected rows to the tokens.

Stages (per layer, per step), each its own call or autograd function:
  input_dist   distinct selected ids -> owners (counts, then int32 local ids)
  compute      each owner looks up the U and V rows asked of it
  output_dist  the rows go back and the requester mixes them with its tokens (ops.peer_mix)
Backward: the rows' gradients go back to their owners (output_dist), which keep them as sparse
gradients of the shard (compute).

Shape legend: T = tokens, S = selections per token, D = dim, R = distinct rows this rank
selected, R_in = rows other ranks (and this one) asked of this owner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peer_dist.ops import peer_mix
from peer_dist.parallel.comm import Exchange
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

    def __init__(self, idmap: IdMap, ex: Exchange, act: str):
        self.idmap, self.ex, self.act = idmap, ex, act

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
                        sparse_grad=False)
