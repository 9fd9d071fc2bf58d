"""Gradient sync of the table shards: once per optimizer step, after backward.

An owner's shard gradient is a sum over the ranks that sent it work (each rank's loss is a mean
over its own tokens), so it is divided by the world size: inside the mix's backward, where the
1/W is folded into each selection's weight (ShardedExperts.table_scale; a pass over the
gradient rows afterwards cost ~8% of a dispatch step). With DP > 1 sync_expert_grads sums the
replicas of a shard over the DP group (reduce_rows: row-sparse, the union of touched rows).
The dense part's gradients are DeepSpeed's; these never enter it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from peer_dist.ops.rows import coalesced
from peer_dist.parallel.store import ShardedExperts


def _sharded(model: nn.Module) -> list[ShardedExperts]:
    return [m for m in model.modules() if isinstance(m, ShardedExperts)]


def sync_expert_grads(model: nn.Module) -> None:
    """Make every shard .grad the single-process gradient of the global-batch mean loss.

    Each rank's loss is a mean over its own tokens, so an owner's gradient is a sum of per-rank
    means divided by the world size (as DDP averages), which the mix's backward has applied.
    With DP > 1 the replicas of a shard saw different tokens: their gradients are summed over
    the DP group."""
    for m in _sharded(model):
        sync_layer_grads(m)


def sync_layer_grads(m: ShardedExperts) -> None:
    """sync_expert_grads for one sharded layer."""
    topo = m.topo
    for i, p in enumerate(m.shard.params()):
        g = _as_sparse(p)
        if topo.dp > 1:
            g = reduce_rows(g, topo.dp_group, topo.dp)
        p.grad = g
        stats = getattr(m, "stats", None)
        if i == 0 and stats is not None:  # the rows routing touched in this shard (U's = V's)
            stats.grad_rows += g._nnz()
            stats.grad_syncs += 1


def _as_sparse(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    if g is None:
        idx = torch.zeros(1, 0, dtype=torch.int64, device=p.device)
        return torch.sparse_coo_tensor(idx, p.new_zeros(0, p.shape[1]), p.shape,
                                       is_coalesced=True)
    if not g.is_sparse:
        return g.to_sparse(1).coalesce()  # dense grads: every row counts as touched
    return coalesced(g)


def reduce_rows(g: torch.Tensor, group, size: int) -> torch.Tensor:
    """Sum row-sparse gradients over a group, keeping the union of touched rows.

    Sparse path (all-gather of (rows, values), padded to the largest count) when the gathered
    rows are fewer than the shard's rows; dense path otherwise (all-reduce of the shard's rows
    plus a touched-count column, so rows touched with an exactly zero gradient stay touched, as
    the single-process lazy optimizer would see them). All ranks take the same path: the choice
    depends only on the all-gathered counts."""
    rows, dim = g.shape
    idx, val = g.indices()[0], g.values()
    counts = [torch.zeros(1, dtype=torch.int64, device=val.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([idx.numel()], device=val.device), group=group)
    most = max(int(c) for c in counts)
    if most * size >= rows:
        buf = val.new_zeros(rows, dim + 1)
        buf[idx, :dim] = val
        buf[idx, dim] = 1.0
        dist.all_reduce(buf, group=group)
        keep = (buf[:, dim] > 0).nonzero().squeeze(1)
        return torch.sparse_coo_tensor(keep[None], buf[keep, :dim], g.shape, is_coalesced=True,
                                       check_invariants=False)
    pad_idx = torch.full((most,), -1, dtype=torch.int64, device=val.device)
    pad_idx[:idx.numel()] = idx
    pad_val = val.new_zeros(most, dim)
    pad_val[:idx.numel()] = val
    all_idx = [torch.empty_like(pad_idx) for _ in range(size)]
    all_val = [torch.empty_like(pad_val) for _ in range(size)]
    dist.all_gather(all_idx, pad_idx, group=group)
    dist.all_gather(all_val, pad_val, group=group)
    idx, val = torch.cat(all_idx), torch.cat(all_val)
    real = idx >= 0
    return torch.sparse_coo_tensor(idx[real][None], val[real], g.shape,
                                   check_invariants=False).coalesce()
