"""The sharded expert store: the sharded twin of model.peer.ExpertTables.

Each rank of an EP group holds the block of table positions [r*b, min((r+1)*b, N)),
b = ceil(N / EP) (DTensor Shard(0) / torch.chunk layout; possibly zero rows). Position = expert
id, or (a*e + c) mod N with the optional balancing bijection (idmap.py).

The shard tensors live in an ExpertShard (a dataclass, not an nn.Module) attached to the
module: they are not parameters of the model, so an engine given model.parameters() (DeepSpeed)
never sees them, and model.state_dict() excludes them (checkpoint them with shard_dtensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from peer_dist.config import STRATEGIES
from peer_dist.model.peer import INIT_BLOCK_ROWS, ExpertTables, init_rows
from peer_dist.ops import mix_dtype, peer_mix
from peer_dist.parallel import cost
from peer_dist.parallel.comm import CommStats, Exchange
from peer_dist.parallel.dispatch import Dispatch
from peer_dist.parallel.fetch import Fetch
from peer_dist.parallel.idmap import IdMap
from peer_dist.parallel.node_dispatch import NodeDispatch
from peer_dist.parallel.topology import Topology


@dataclass
class ExpertShard:
    """One PEER layer's local rows of U and V (leaf tensors with sparse COO gradients)."""

    name: str
    u: torch.Tensor  # (rows, D) positions [row_start, row_start + rows)
    v: torch.Tensor
    row_start: int
    num_experts: int
    dim: int
    idmap: IdMap = field(repr=False)

    @property
    def rows(self) -> int:
        return self.u.shape[0]

    def expert_ids(self) -> torch.Tensor:
        """(rows,) the expert id stored in each local row."""
        pos = torch.arange(self.row_start, self.row_start + self.rows, device=self.u.device)
        return self.idmap.expert(pos)

    def params(self) -> list[torch.Tensor]:
        return [self.u, self.v]


def shard_rows(seed: int, std: float, idmap: IdMap, start: int, stop: int, dim: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Positions [start, stop) of a table whose expert e has init_rows(seed, e, e+1) values.

    Identity map: one init_rows call. Permuted map: the experts are scattered, so the table is
    regenerated one INIT_BLOCK_ROWS block at a time and the rows kept (memory: one block)."""
    if idmap.identity:
        return init_rows(seed, start, stop, dim, std, dtype)
    experts = idmap.expert(torch.arange(start, stop))
    out = torch.empty(stop - start, dim, dtype=dtype)
    blocks = torch.div(experts, INIT_BLOCK_ROWS, rounding_mode="floor")
    for blk in torch.unique(blocks).tolist():
        where = (blocks == blk).nonzero().squeeze(1)
        lo = blk * INIT_BLOCK_ROWS
        rows = init_rows(seed, lo, min(lo + INIT_BLOCK_ROWS, idmap.n), dim, std, dtype)
        out[where] = rows[experts[where] - lo]
    return out


def build_shard(name: str, tables: ExpertTables, idmap: IdMap, owner: int,
                device: torch.device) -> ExpertShard:
    """This owner's rows: copied from materialised tables, else initialised from the seeds."""
    start, stop = idmap.rows_of(owner)
    n, d = tables.num_experts, tables.dim
    if tables.u.device.type != "meta":
        pos = torch.arange(start, stop, device=tables.u.device)
        u, v = (t.detach()[idmap.expert(pos)] for t in (tables.u, tables.v))
    else:
        su, sv = tables.table_seeds()
        u = shard_rows(su, tables.std, idmap, start, stop, d, tables.u.dtype)
        v = shard_rows(sv, tables.std, idmap, start, stop, d, tables.v.dtype)
    u = u.to(device).contiguous().requires_grad_(True)
    v = v.to(device).contiguous().requires_grad_(True)
    return ExpertShard(name, u, v, start, n, d, idmap)


class ShardedExperts(nn.Module):
    """(x (T, D), ids (T, S), gates (T, S)) -> y (T, D), with the tables sharded over EP ranks.

    Each strategy (fetch.Fetch, dispatch.Dispatch, node_dispatch.NodeDispatch) is three
    stages, torchrec's shape: input_dist (what travels to the owners), compute (the work at the
    owner), output_dist (what travels back, and how it becomes y). forward composes them;
    stats.stage_seconds times each (forward; the backward's traffic is in stats.seconds)."""

    def __init__(self, name: str, tables: ExpertTables, topo: Topology, strategy: str = "auto",
                 balance_ids: bool = False, overlap_chunks: int = 1):
        super().__init__()
        self.overlap_chunks = overlap_chunks  # fetch, dispatch: transfers under compute
        if strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy={strategy!r}: allowed are {list(STRATEGIES)}")
        self.activation, self.strategy, self.topo = tables.activation, strategy, topo
        self.idmap = IdMap(tables.num_experts, topo.ep, balance=balance_ids)
        self._shard = build_shard(name, tables, self.idmap, topo.ep_rank, topo.device)
        self.stats = CommStats()
        ex = Exchange(topo.ep_group, topo.ep, topo.ep_rank, self.stats, topo.ep_nodes)
        # the 1/W of sync_expert_grads, folded into the mix's table gradients (no pass over
        # the rows afterwards): each rank's loss is a mean over its own tokens
        self.table_scale = 1.0 / topo.world_size
        self.strategies = {st.name: st(self.idmap, ex, self.activation, self.table_scale)
                           for st in (Fetch, Dispatch, NodeDispatch)}

    @property
    def shard(self) -> ExpertShard:
        return self._shard

    def forward(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        dtype = mix_dtype(x, self._shard.u)  # the tables' on CPU; the activations' for Triton
        if x.dtype != dtype:  # what travels and what the owners mix is in that dtype
            return self.forward(x.to(dtype), ids, gates.to(dtype)).to(x.dtype)
        strategy = self.choose(ids, x.element_size())
        self.stats.note_call(strategy, x.shape[0])
        u, v = self._shard.u, self._shard.v
        if strategy == "local":  # EP = 1: every row is here, no exchange at all
            with self.stats.stage("compute"):
                return peer_mix(x, self.idmap.position(ids), gates, u, v, self.activation, True,
                                self.table_scale)
        st = self.strategies[strategy]
        if self.overlap_chunks > 1 and st.overlaps:  # the stages fused, pipelined
            with self.stats.stage("overlapped"):
                return st.overlapped(x, ids, gates, u, v, self.overlap_chunks)
        with self.stats.stage("input_dist"):
            sent = st.input_dist(x, ids, gates)
        with self.stats.stage("compute"):
            out = st.compute(sent, u, v)
        with self.stats.stage("output_dist"):
            return st.output_dist(sent, out, x.shape[0])

    def choose(self, ids: torch.Tensor, elem: int) -> str:
        """The strategy for this step (the cost model's choice under "auto")."""
        if self.strategy != "auto":
            return self.strategy
        return cost.choose_strategy(ids, self.idmap, self.topo.ep_rank,
                                    self.strategies["node_dispatch"].routes, self._shard.dim,
                                    elem, self.topo.ep_group)

    def extra_repr(self) -> str:
        s = self._shard
        return (f"{s.name}: rows [{s.row_start}, {s.row_start + s.rows}) of {s.num_experts}, "
                f"dim={s.dim}, strategy={self.strategy}, balanced={not self.idmap.identity}")
