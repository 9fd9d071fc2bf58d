"""Bytes model for one PEER layer and one training step (forward + backward), per rank.

All figures are bytes a rank SENDS to other ranks (its own slice is a local copy); summed over a
group, bytes sent equal bytes received. D = dim, e = element bytes of activations and rows,
S = selections per token (heads * topk), W = EP group size.

fetch (rows travel):
    fwd  counts (W-1)*8, local ids R_out*4, U and V rows back R_in*2De   bwd  row grads R_out*2De
dispatch (tokens travel, one x per (token, owner) pair):
    fwd  counts (W-1)*16, x P_out*De, (id, pair, gate) Q_out*(8 + 4*ceil(e/4)),
         partial y back P_in*De
    bwd  dy P_out*De, dx back P_in*De, dgate back Q_in*e
replicated baseline: ring all-reduce of the dense U, V gradients (2*N*D*e bytes):
    2*(W-1)/W * 2NDe
R_out = distinct rows this rank asks of other owners, P_out = (token, other owner) pairs,
Q_out = selections held by other owners; *_in are the same counts seen from the owner. Over a
group sum(R_in) = sum(R_out) (and so on), so the per-rank formulas below, written with the
"out" counts only, add up to the exact group total.

The choice between the strategies is made here too (choose_strategy): from the ids each rank
holds, the EP group's total bytes of each, one small all_reduce, the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from peer_dist.parallel.idmap import IdMap

ID_BYTES = 4  # local row ids travel as int32
COUNT_BYTES = 8  # split counts travel as int64


def meta_bytes(elem: int) -> int:
    """dispatch, per selection: (local row, pair index) int32, then the gate in the
    activations' dtype padded to whole int32 words."""
    return 8 + 4 * -(-elem // 4)


def fetch_bytes(rows_out: float, ep: int, dim: int, elem: int) -> float:
    """Bytes one rank sends for fetch, one step (fwd + bwd), symmetric traffic assumed."""
    if ep == 1:
        return 0.0
    return COUNT_BYTES * (ep - 1) + rows_out * (ID_BYTES + 4 * dim * elem)


def dispatch_bytes(pairs_out: float, sels_out: float, ep: int, dim: int, elem: int) -> float:
    """Bytes one rank sends for dispatch, one step (fwd + bwd), symmetric traffic assumed."""
    if ep == 1:
        return 0.0
    return (2 * COUNT_BYTES * (ep - 1) + pairs_out * 4 * dim * elem
            + sels_out * (meta_bytes(elem) + elem))


def replicated_bytes(num_experts: int, dim: int, world: int, elem: int) -> float:
    """Bytes one rank sends to all-reduce dense U and V gradients with a ring, one step."""
    return 2.0 * (world - 1) / world * 2 * num_experts * dim * elem


def block_rows(num_experts: int, ep: int) -> list[int]:
    """Rows per owner in the torch.chunk layout (the last owners may hold fewer, or none)."""
    b = -(-num_experts // ep)
    return [max(0, min(b, num_experts - r * b)) for r in range(ep)]


def expected_distinct(num: int, draws: float) -> float:
    """E[distinct values] among `draws` uniform draws from `num` values."""
    return num * (1.0 - (1.0 - 1.0 / num) ** draws)


@dataclass
class LayerShape:
    num_experts: int
    dim: int
    selections: int  # heads * topk
    tokens: int  # per rank, per step
    ep: int
    world: int
    elem: int = 4  # bytes per element (4 fp32, 2 bf16)

    def owners_touched(self) -> float:
        """E[owners holding at least one of a token's S uniform selections]."""
        n = self.num_experts
        return sum(1.0 - (1.0 - b / n) ** self.selections
                   for b in block_rows(n, self.ep))


def predict_per_token(shape: LayerShape) -> dict[str, float]:
    """Bytes per token per layer and step each strategy sends, for uniform random expert ids.

    Remote shares use the average over ranks: a rank's own owner holds 1/EP of everything."""
    s, ep = shape, shape.ep
    remote = (ep - 1) / ep
    rows = expected_distinct(s.num_experts, s.tokens * s.selections) * remote
    pairs = s.tokens * s.owners_touched() * remote
    sels = s.tokens * s.selections * remote
    return {
        "fetch": fetch_bytes(rows, ep, s.dim, s.elem) / s.tokens,
        "dispatch": dispatch_bytes(pairs, sels, ep, s.dim, s.elem) / s.tokens,
        "replicated": replicated_bytes(s.num_experts, s.dim, s.world, s.elem) / s.tokens,
    }


def table_bytes_per_rank(num_experts: int, dim: int, ep: int, elem: int = 4) -> int:
    """Bytes of the largest local U and V shard (parameters only)."""
    return 2 * block_rows(num_experts, ep)[0] * dim * elem


def fetch_rows_out(ids: torch.Tensor, idmap: IdMap, me: int) -> int:
    """Distinct rows this rank would ask of other owners."""
    owner, _ = idmap.split(idmap.position(torch.unique(ids)))
    return int((owner != me).sum())


def dispatch_counts_out(ids: torch.Tensor, idmap: IdMap, me: int) -> tuple[int, int]:
    """(pairs, selections) this rank would send to other owners."""
    t, s = ids.shape
    owner, _ = idmap.split(idmap.position(ids.reshape(-1)))
    token = torch.arange(t, device=ids.device).repeat_interleave(s)
    remote = owner != me
    pairs = torch.unique(owner[remote] * t + token[remote]).numel()
    return pairs, int(remote.sum())


def predicted_bytes(ids: torch.Tensor, idmap: IdMap, me: int, ep: int, dim: int,
                    elem: int) -> tuple[float, float]:
    """(fetch, dispatch) bytes this rank would send this step, from the ids it holds."""
    pairs, sels = dispatch_counts_out(ids, idmap, me)
    return (fetch_bytes(fetch_rows_out(ids, idmap, me), ep, dim, elem),
            dispatch_bytes(pairs, sels, ep, dim, elem))


def choose_strategy(ids: torch.Tensor, idmap: IdMap, me: int, ep: int, dim: int, elem: int,
                    group) -> str:
    """"local" at EP = 1, else the strategy that sends fewer bytes over the whole EP group;
    identical on every rank of the group (each knows its own traffic: one tiny all_reduce)."""
    if ep == 1:
        return "local"
    est = torch.tensor(predicted_bytes(ids, idmap, me, ep, dim, elem), dtype=torch.float64,
                       device=ids.device)
    dist.all_reduce(est, group=group)
    return "fetch" if float(est[0]) < float(est[1]) else "dispatch"
