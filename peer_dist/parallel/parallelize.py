"""parallelize(model, topo, cfg): swap single-process expert tables for sharded stores.

Order of what it does, for every PEER layer of the model:
  1. experts: ExpertTables (meta or materialised) -> ShardedExperts (own rows only)
  2. router.norm: nn.BatchNorm1d -> SyncBatchNorm1d when cfg.bn_sync == "global" and world > 1
The model's own code never sees torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from peer_dist.config import ParallelConfig
from peer_dist.model.peer import PEER
from peer_dist.parallel.batchnorm import SyncBatchNorm1d
from peer_dist.parallel.store import ExpertShard, ShardedExperts
from peer_dist.parallel.topology import Topology


def parallelize(model: nn.Module, topo: Topology, cfg: ParallelConfig) -> nn.Module:
    """Shard every PEER layer's tables over topo's EP groups (in place; returns the model)."""
    cfg.validate()
    if cfg.ep not in (0, topo.ep):
        raise ValueError(f"parallel.ep={cfg.ep} but the topology was built with ep={topo.ep}: "
                         f"build it with Topology.build(cfg.parallel.ep)")
    for name, layer in model.named_modules():
        if not isinstance(layer, PEER):
            continue
        prefix = f"{name}." if name else ""
        layer.experts = ShardedExperts(f"{prefix}experts", layer.experts, topo, cfg.strategy,
                                       cfg.balance_ids)
        norm = layer.router.norm
        if isinstance(norm, nn.BatchNorm1d) and cfg.bn_sync == "global" and topo.world_size > 1:
            layer.router.norm = SyncBatchNorm1d(norm)
    return model


def sharded_modules(model: nn.Module) -> list[ShardedExperts]:
    return [m for m in model.modules() if isinstance(m, ShardedExperts)]


def expert_shards(model: nn.Module) -> list[ExpertShard]:
    """The local table shards, in module order (not in model.parameters())."""
    return [m.shard for m in sharded_modules(model)]


def sync_expert_grads(model: nn.Module) -> None:
    """Make every shard .grad the single-process gradient of the global-batch mean loss.

    Each rank's loss is a mean over its own tokens, so an owner's gradient is a sum of per-rank
    means: divide by the world size (as DDP averages). With DP > 1 the replicas of a shard saw
    different tokens: their gradients are summed over the DP group first."""
    for m in sharded_modules(model):
        sync_layer_grads(m)


def sync_layer_grads(m: ShardedExperts) -> None:
    """sync_expert_grads for one sharded layer."""
    topo = m.topo
    for p in m.shard.params():
        g = _as_sparse(p)
        if topo.dp > 1:
            g = reduce_rows(g, topo.dp_group, topo.dp)
        p.grad = g * (1.0 / topo.world_size)


def _as_sparse(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    if g is None:
        idx = torch.zeros(1, 0, dtype=torch.int64, device=p.device)
        return torch.sparse_coo_tensor(idx, p.new_zeros(0, p.shape[1]), p.shape,
                                       is_coalesced=True)
    if not g.is_sparse:
        return g.to_sparse(1).coalesce()  # dense grads: every row counts as touched
    return g.coalesce()


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


def comm_stats(model: nn.Module) -> dict[str, dict]:
    """Per sharded layer: strategy, bytes_sent, bytes_recv, seconds (cumulative), and more."""
    return {m.shard.name: m.stats.as_dict() for m in sharded_modules(model)}


def reset_comm_stats(model: nn.Module) -> None:
    for m in sharded_modules(model):
        m.stats.reset()


def shard_dtensors(shard: ExpertShard, topo: Topology) -> dict:
    """{"u", "v"}: DTensors over topo.mesh with placements [Replicate(), Shard(0)] (torch.chunk
    layout: EP rank r holds rows [r*b, min((r+1)*b, N))), for torch.distributed.checkpoint."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape, stride = (shard.num_experts, shard.dim), (shard.dim, 1)
    return {name: DTensor.from_local(t, topo.mesh, [Replicate(), Shard(0)], run_check=False,
                                     shape=shape, stride=stride)
            for name, t in (("u", shard.u), ("v", shard.v))}
