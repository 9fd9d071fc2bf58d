"""World = DP x EP. Every rank trains on its own tokens; EP only decides where table rows live.

Rank layout (row-major over the mesh (dp, ep)): rank = dp_rank * ep + ep_rank, so an
expert-parallel group is EP consecutive ranks (one node, when EP <= GPUs per node) and a DP group
holds the ranks with the same ep_rank (replicas of one shard).

Nodes: torchrun numbers the ranks of a node consecutively, so rank r sits on node
r // LOCAL_WORLD_SIZE (torchrun sets it; unset means one node). `ep_nodes` gives the node of
each EP group member: node-aware dispatch and the per-link byte counts read it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from peer_dist.errors import UserError

# Process groups are built once per (world, ep, ranks per node): building them again would
# create new communicators on every rank, and every rank must do it in the same order.
_BUILT: dict[tuple[int, int, int], Topology] = {}


class TopologyError(UserError, ValueError):
    """A parallel degree that does not fit the world; the message names the allowed values.
    Every rank computes it from the same numbers, so every rank raises it (rank 0 reports)."""

    def __init__(self, message: str):
        super().__init__(message, all_ranks=True)


def pick_backend() -> str:
    """nccl on CUDA (unless PEER_BACKEND=gloo), gloo otherwise."""
    wanted = os.environ.get("PEER_BACKEND", "")
    if wanted not in ("", "nccl", "gloo"):
        raise TopologyError(f"PEER_BACKEND={wanted!r}: allowed are 'nccl', 'gloo' or unset")
    if wanted == "gloo" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Initialise the default process group from torchrun's environment (idempotent).

    Without torchrun's variables it starts a world of one (handy for tools and tests).
    timeout_s bounds every collective's wait (the mesh's groups inherit it); None keeps
    torch's default.
    """
    if dist.is_initialized():
        return
    backend = backend or pick_backend()
    if "RANK" not in os.environ:  # a world of one talks to itself only, whatever the shell
        # holds (a MASTER_ADDR left from a cluster job made it wait on that host for ever)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_degrees(world_size: int, ep: int) -> tuple[int, int]:
    """(ep, dp) for a requested ep (0 = the whole world); raises TopologyError if it cannot fit."""
    if world_size < 1:
        raise TopologyError(f"world_size={world_size}: must be >= 1")
    if ep < 0:
        raise TopologyError(f"parallel.ep={ep}: allowed are 0 (the whole world) or a divisor of "
                            f"the world size {world_size}")
    ep = ep or world_size
    if world_size % ep != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise TopologyError(f"parallel.ep={ep} does not divide the world size {world_size}: "
                            f"allowed are 0 or one of {divisors}")
    return ep, world_size // ep


def ranks_per_node(world_size: int) -> int:
    """LOCAL_WORLD_SIZE (torchrun's ranks per node), the whole world when unset."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "")
    try:
        local = int(raw) if raw else world_size
    except ValueError:
        local = 0
    if local < 1 or world_size % local != 0:
        raise TopologyError(f"LOCAL_WORLD_SIZE={raw!r}: allowed is a divisor of the world size "
                            f"{world_size} (ranks per node; unset = one node)")
    return local


@dataclass
class Topology:
    rank: int
    world_size: int
    ep: int
    dp: int
    ep_rank: int
    dp_rank: int
    ep_group: Any  # ProcessGroup of the EP ranks holding one copy of the tables
    dp_group: Any  # ProcessGroup of the DP replicas of this rank's shard
    device: torch.device
    mesh: Any  # DeviceMesh of shape (dp, ep), names ("dp", "ep")
    backend: str = "gloo"
    local_world_size: int = 0  # ranks per node; 0 = the whole world (one node)
    ep_nodes: tuple[int, ...] = ()  # (ep,) node of each EP group member

    @property
    def nodes(self) -> int:
        return self.world_size // (self.local_world_size or self.world_size)

    @classmethod
    def build(cls, ep: int = 0) -> Topology:
        """Topology of the initialised default process group; ep=0 means the whole world."""
        if not dist.is_initialized():
            raise TopologyError("torch.distributed is not initialised: call "
                                "peer_dist.parallel.init_distributed() (or run under torchrun)")
        world, rank = dist.get_world_size(), dist.get_rank()
        ep, dp = check_degrees(world, ep)
        local = ranks_per_node(world)
        if (world, ep, local) in _BUILT:
            return _BUILT[(world, ep, local)]
        backend = dist.get_backend()
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            device = torch.device("cpu")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
        topo = cls(rank=rank, world_size=world, ep=ep, dp=dp, ep_rank=rank % ep,
                   dp_rank=rank // ep, ep_group=mesh.get_group("ep"),
                   dp_group=mesh.get_group("dp"), device=device, mesh=mesh, backend=backend,
                   local_world_size=local,
                   ep_nodes=tuple((rank - rank % ep + j) // local for j in range(ep)))
        _BUILT[(world, ep, local)] = topo
        return topo

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: ep={self.ep} (ep_rank {self.ep_rank}), "
                f"dp={self.dp} (dp_rank {self.dp_rank}), {self.nodes} node(s), {self.backend} on "
                f"{self.device}")
