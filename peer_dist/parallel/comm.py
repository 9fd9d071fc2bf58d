"""Variable-split all-to-all over an EP group, with byte and time accounting.

Every exchange has the same shape: one equal-split all-to-all of int64 counts (the only host
sync, done once per layer in the forward pass; backward reuses the splits), then payload
all-to-alls whose splits are those counts. `all_to_all_single` is used throughout: gloo supports
variable splits there, while the list form `all_to_all` is missing on some gloo builds.

Byte accounting: `bytes_sent` / `bytes_recv` count what is handed to and returned by
`all_to_all_single` for OTHER ranks: the slice a rank addresses to itself is a local copy and
never leaves the process, so it is not counted (the cost model counts the same way).
`bytes_internode` is the part of `bytes_sent` addressed to ranks on other nodes (the Exchange
knows each member's node); the rest of `bytes_sent` stayed inside the node.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Cumulative traffic of one sharded layer, by direction ("fwd", "bwd")."""

    strategy: str = ""  # strategy of the latest step
    bytes_sent: dict[str, int] = field(default_factory=lambda: {"fwd": 0, "bwd": 0})
    bytes_recv: dict[str, int] = field(default_factory=lambda: {"fwd": 0, "bwd": 0})
    bytes_internode: dict[str, int] = field(default_factory=lambda: {"fwd": 0, "bwd": 0})
    seconds: float = 0.0
    collectives: int = 0  # all-to-alls made (counts and payloads, both directions)
    calls: int = 0  # forward calls
    strategy_calls: dict[str, int] = field(default_factory=dict)
    tokens: int = 0  # tokens this rank sent through the layer
    stage_seconds: dict[str, float] = field(default_factory=dict)  # forward, by stage
    grad_rows: int = 0  # rows of the shard's U gradient after each sync, summed over syncs
    grad_syncs: int = 0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one forward stage (input_dist, compute, output_dist), cumulatively."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + (
                time.perf_counter() - t0)

    def add(self, direction: str, sent: int, recv: int, seconds: float,
            internode: int = 0) -> None:
        """sent and recv: bytes to / from other ranks; internode: the part of sent that left
        the node."""
        self.bytes_sent[direction] += int(sent)
        self.bytes_recv[direction] += int(recv)
        self.bytes_internode[direction] += int(internode)
        self.seconds += seconds
        self.collectives += 1

    def note_call(self, strategy: str, tokens: int) -> None:
        self.strategy = strategy
        self.calls += 1
        self.tokens += int(tokens)
        self.strategy_calls[strategy] = self.strategy_calls.get(strategy, 0) + 1

    def as_dict(self) -> dict:
        sent, far = sum(self.bytes_sent.values()), sum(self.bytes_internode.values())
        return {
            "strategy": self.strategy,
            "bytes_sent": sum(self.bytes_sent.values()),
            "bytes_recv": sum(self.bytes_recv.values()),
            "bytes_sent_fwd": self.bytes_sent["fwd"], "bytes_sent_bwd": self.bytes_sent["bwd"],
            "bytes_recv_fwd": self.bytes_recv["fwd"], "bytes_recv_bwd": self.bytes_recv["bwd"],
            "bytes_sent_internode": far,
            "bytes_sent_intranode": sent - far,
            # per token this rank sent through the layer (fwd + bwd, summed over its calls)
            "bytes_internode_per_token": far / self.tokens if self.tokens else 0.0,
            "bytes_intranode_per_token": (sent - far) / self.tokens if self.tokens else 0.0,
            "seconds": self.seconds,
            "collectives": self.collectives,
            "calls": self.calls,
            "tokens": self.tokens,
            "strategy_calls": dict(self.strategy_calls),
            "stage_seconds": dict(self.stage_seconds),
            # rows of the shard's gradient per step (what routing touched; memory/grad terms)
            "grad_rows": self.grad_rows / self.grad_syncs if self.grad_syncs else 0.0,
        }

    def reset(self) -> None:
        fresh = CommStats()
        self.__dict__.update(fresh.__dict__)


class Exchange:
    """One EP group's all-to-all endpoint: the group, this rank's index in it, the stats sink,
    and the node of each member (all on one node unless given)."""

    def __init__(self, group, size: int, rank: int, stats: CommStats,
                 nodes: tuple[int, ...] | None = None):
        self.group, self.size, self.rank, self.stats = group, size, rank, stats
        self.nodes = tuple(nodes) if nodes else (0,) * size
        # (W,) 1 where a member sits on another node than this rank
        self.remote_node = [int(n != self.nodes[rank]) for n in self.nodes]

    def internode(self, splits: list[int]) -> int:
        """Rows of a send, by destination (W,), that go to other nodes."""
        return sum(c for c, far in zip(splits, self.remote_node, strict=True) if far)

    def counts(self, send: torch.Tensor,
               direction: str = "fwd") -> tuple[list[list[int]], list[list[int]]]:
        """send (W, C) int64: C counts per destination -> (sent, received) (W, C) as lists.

        The single host sync of an exchange: one copy of both tables to the host after the
        collective."""
        send = send.to(torch.int64).contiguous()
        if self.size == 1:
            both = send.tolist()
            return both, both
        t0 = time.perf_counter()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        both = torch.stack([send, recv]).cpu().tolist()
        remote = (self.size - 1) * send.shape[1] * 8
        far = sum(self.remote_node) * send.shape[1] * 8
        self.stats.add(direction, remote, remote, time.perf_counter() - t0, far)
        return both[0], both[1]

    def gather_counts(self, mine: torch.Tensor) -> list[list[int]]:
        """mine (C,) int64 counts -> (W, C) every member's, as lists (one equal-split
        all-to-all of the row repeated W times: the one host sync of node-aware dispatch)."""
        mine = mine.to(torch.int64).reshape(1, -1)
        if self.size == 1:
            return mine.tolist()
        send = mine.expand(self.size, -1).contiguous()
        return self.counts(send)[1]

    def send(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
             direction: str) -> torch.Tensor:
        """Rows of x (sum(send_splits), ...) grouped by destination -> received rows, by source."""
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=self.group)
        row_bytes = x.element_size() * math.prod(x.shape[1:])
        sent = (sum(send_splits) - send_splits[self.rank]) * row_bytes
        recv = (sum(recv_splits) - recv_splits[self.rank]) * row_bytes
        self.stats.add(direction, sent, recv, time.perf_counter() - t0,
                       self.internode(send_splits) * row_bytes)
        return out

    def send_two(self, a: torch.Tensor, a_splits: list[int], a_recv: list[int], b: torch.Tensor,
                 b_splits: list[int], b_recv: list[int],
                 direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """send() of two row-grouped tensors (any dtypes) in one all-to-all, their bytes side by
        side per destination: one collective's latency instead of two (x and the per-selection
        metadata of dispatch; dx and dgates back). Bytes counted as two sends would."""
        if self.size == 1:
            return a, b
        two = Two(a, a_splits, a_recv, b, b_splits, b_recv)
        return two.unpack(self.send(two.packed, two.send_splits, two.recv_splits, direction))


class Two:
    """Two row-grouped tensors packed for one all-to-all, their bytes side by side per
    destination (uint8 rows), and the received bytes split back into the two."""

    def __init__(self, a: torch.Tensor, a_splits: list[int], a_recv: list[int],
                 b: torch.Tensor, b_splits: list[int], b_recv: list[int]):
        rows = [math.prod(t.shape[1:]) * t.element_size() for t in (a, b)]
        flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        sends = [[n * r for n in s] for r, s in zip(rows, (a_splits, b_splits), strict=True)]
        recvs = [[n * r for n in s] for r, s in zip(rows, (a_recv, b_recv), strict=True)]
        pieces = zip(flat[0].split(sends[0]), flat[1].split(sends[1]), strict=True)
        self.packed = torch.cat([p for pair in pieces for p in pair])
        self.send_splits = [x + y for x, y in zip(*sends, strict=True)]
        self.recv_splits = [x + y for x, y in zip(*recvs, strict=True)]
        self.pieces = [n for pair in zip(*recvs, strict=True) for n in pair]
        self.like = (a, b)

    def unpack(self, got: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = got.split(self.pieces)
        a_in, b_in = (torch.cat(parts[i::2]).view(t.dtype).view(-1, *t.shape[1:])
                      for i, t in enumerate(self.like))
        return a_in, b_in


class Pending:
    """An all-to-all in flight: wait() returns its output and counts the time spent waiting
    (the exposed part of the transfer) in stats.seconds and stage_seconds["comm_wait"]."""

    def __init__(self, out: torch.Tensor, work, stats: CommStats):
        self.out, self.work, self.stats = out, work, stats

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            t0 = time.perf_counter()
            self.work.wait()
            waited = time.perf_counter() - t0
            self.stats.seconds += waited
            self.stats.stage_seconds["comm_wait"] = self.stats.stage_seconds.get(
                "comm_wait", 0.0) + waited
            self.work = None
        return self.out


def send_async(ex: Exchange, x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               direction: str) -> Pending:
    """Exchange.send without waiting: the transfer runs in the process group's threads while
    the caller computes; bytes are counted now, seconds when waited for."""
    if ex.size == 1:
        return Pending(x, None, ex.stats)
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_split_sizes=recv_splits,
                                  input_split_sizes=send_splits, group=ex.group, async_op=True)
    row_bytes = x.element_size() * math.prod(x.shape[1:])
    ex.stats.add(direction, (sum(send_splits) - send_splits[ex.rank]) * row_bytes,
                 (sum(recv_splits) - recv_splits[ex.rank]) * row_bytes, 0.0,
                 ex.internode(send_splits) * row_bytes)
    return Pending(out, work, ex.stats)


class PendingTwo:
    """send_two_async in flight: wait() returns the two received tensors."""

    def __init__(self, pending: Pending, two: Two | None):
        self.pending, self.two = pending, two

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.pending.wait()
        return self.two.unpack(got) if self.two is not None else got


def send_two_async(ex: Exchange, a: torch.Tensor, a_splits: list[int], a_recv: list[int],
                   b: torch.Tensor, b_splits: list[int], b_recv: list[int],
                   direction: str) -> PendingTwo:
    """Exchange.send_two without waiting (one collective in flight for both tensors)."""
    if ex.size == 1:
        return PendingTwo(Pending((a, b), None, ex.stats), None)
    two = Two(a, a_splits, a_recv, b, b_splits, b_recv)
    return PendingTwo(send_async(ex, two.packed, two.send_splits, two.recv_splits, direction),
                      two)


def owner_starts(splits: list[int], device: torch.device) -> torch.Tensor:
    """(W,) offset of each source's block in a received buffer."""
    t = torch.tensor(splits, dtype=torch.int64, device=device)
    return torch.cumsum(t, 0) - t


def source_of_rows(splits: list[int], device: torch.device) -> torch.Tensor:
    """(sum(splits),) the source rank of each received row."""
    t = torch.tensor(splits, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(splits), device=device), t)
