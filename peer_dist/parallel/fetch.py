"""fetch: bring the selected rows to the tokens.

Stages (per layer, per step):
  input_dist   distinct selected ids -> owners (counts, then int32 local ids)
  compute      owners gather U and V rows and send them back; the layer mixes locally
  output_dist  backward: row gradients go back to the owners, which keep them (sparse)

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


class FetchRows(torch.autograd.Function):
    """(u, v) local shard -> (U rows, V rows) (R, D) of the rows this rank selected.

    Backward returns the row gradients to their owners as sparse COO gradients of the shard."""

    @staticmethod
    def forward(ctx, u, v, plan: FetchPlan, ex: Exchange):
        # U and V rows travel as two messages: no (R, 2D) concatenation and split copies
        ctx.plan, ctx.ex, ctx.shape = plan, ex, u.shape
        return tuple(ex.send(t[plan.served], plan.recv_splits, plan.send_splits, "fwd")
                     for t in (u, v))  # (R, D) each

    @staticmethod
    def backward(ctx, gu, gv):
        plan, ex, shape = ctx.plan, ctx.ex, ctx.shape
        gu = gu if gu is not None else torch.zeros_like(gv)
        gv = gv if gv is not None else torch.zeros_like(gu)
        idx = plan.served[None]
        du, dv = (torch.sparse_coo_tensor(
            idx, ex.send(g.contiguous(), plan.send_splits, plan.recv_splits, "bwd"), shape,
            check_invariants=False) for g in (gu, gv))  # (R_in, D) rows at the owner
        return du, dv, None, None


def fetch_mix(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, u: torch.Tensor,
              v: torch.Tensor, idmap: IdMap, ex: Exchange, act: str) -> torch.Tensor:
    """x (T, D), ids (T, S) global expert ids, gates (T, S) -> y (T, D)."""
    plan = plan_fetch(ids, idmap, ex)
    u_rows, v_rows = FetchRows.apply(u, v, plan, ex)
    return peer_mix(x, plan.mix_ids, gates, u_rows, v_rows, act, sparse_grad=False)


def fetch_rows_out(ids: torch.Tensor, idmap: IdMap, me: int) -> int:
    """Distinct rows this rank would ask of other owners (for the cost model)."""
    owner, _ = idmap.split(idmap.position(torch.unique(ids)))
    return int((owner != me).sum())
