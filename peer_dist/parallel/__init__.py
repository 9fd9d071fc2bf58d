"""Expert tables sharded over ranks, reached with all-to-all; routing replicated.

    topo = Topology.build(ep)                      # after init_distributed()
    model = parallelize(model, topo, cfg.parallel) # meta tables -> sharded stores
    shards = expert_shards(model)                  # local rows, not in model.parameters()
    sync_expert_grads(model)                       # once per optimizer step
    comm_stats(model)                              # bytes and seconds per layer
"""

from peer_dist.parallel.batchnorm import SyncBatchNorm1d
from peer_dist.parallel.comm import CommStats
from peer_dist.parallel.grad_sync import sync_expert_grads
from peer_dist.parallel.idmap import IdMap
from peer_dist.parallel.parallelize import (
    comm_stats,
    expert_shards,
    parallelize,
    reset_comm_stats,
    shard_dtensors,
)
from peer_dist.parallel.store import ExpertShard, ShardedExperts
from peer_dist.parallel.topology import Topology, TopologyError, init_distributed

__all__ = ["CommStats", "ExpertShard", "IdMap", "ShardedExperts", "SyncBatchNorm1d", "Topology",
           "TopologyError", "comm_stats", "expert_shards", "init_distributed", "parallelize",
           "reset_comm_stats", "shard_dtensors", "sync_expert_grads"]
