"""parallelize(model, topo, cfg): swap single-process expert tables for sharded stores.

Order of what it does, for every PEER layer of the model:
  1. experts: ExpertTables (meta or materialised) -> ShardedExperts (own rows only)
  2. router.norm: nn.BatchNorm1d -> SyncBatchNorm1d when cfg.bn_sync == "global" and world > 1
The model's own code never sees torch.distributed.
"""

from __future__ import annotations

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
                                       cfg.balance_ids, cfg.overlap_chunks)
        norm = layer.router.norm
        if isinstance(norm, nn.BatchNorm1d) and cfg.bn_sync == "global" and topo.world_size > 1:
            layer.router.norm = SyncBatchNorm1d(norm)
    return model


def sharded_modules(model: nn.Module) -> list[ShardedExperts]:
    return [m for m in model.modules() if isinstance(m, ShardedExperts)]


def expert_shards(model: nn.Module) -> list[ExpertShard]:
    """The local table shards, in module order (not in model.parameters())."""
    return [m.shard for m in sharded_modules(model)]


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
