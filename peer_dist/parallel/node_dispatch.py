"""node_dispatch: dispatch in two hops, so that a token crosses to each remote node once.

Flat dispatch sends x once per (token, owner): with S = 128 selections a token reaches nearly
every owner, so the bytes on the slow inter-node links grow with the number of ranks. Here a
token goes once per (token, node) to one rank of that node, its gateway, which forwards it to
the owners on its node over the fast links; the owners' partials are summed at the gateway, and
one sum per (token, node) travels back (DeepEP's layout for MoE).

Gateways: member s sends to node B through the member of B with s's index within its own node
(modulo B's size): rail-aligned, and s is its own gateway to its own node, so tokens for owners
on s's node go there directly, as in flat dispatch.

Stages (per layer, per step):
  input_dist   hop 1: per (token, node) x once, plus (row within the node, pair, gate) per
               selection, to the gateway; hop 2: the gateway regroups what it received by
               (received pair, owner) and sends x once per pair to the owners on its node
  compute      the owner mixes its experts (ops.ragged_mix), as in flat dispatch
  output_dist  partials back to the gateway, summed per received pair; those sums back to
               the source, summed per token
Both hops are dispatch's autograd functions (SendTokens, ReturnPartials) with other routes, so
backward mirrors the forward: dL/dy fans out the same way, dL/dx partials are summed at the
gateway before they cross back, the U and V gradients stay at the owners.

One host sync per layer: every member's per-owner pair and selection counts and per-node pair
counts, gathered once; both hops' splits follow from them on the host.

Overlap (parallel.overlap_chunks = C > 1, OverlappedNodeDispatch): the tokens are cut into C
chunks, planned at once (one count exchange for all). A chunk is four dependent transfers each
way (hop 1, hop 2, the partials to the gateway, the sums home) with the gateway's regrouping
(plan_relay, which needs hop 1's data) between them, so the pipeline interleaves chunks: chunk
i+1's hop 1 (the inter-node one) travels while chunk i is relayed and mixed, and chunk i's
partials travel back under chunk i+1's work; backward the same with dL/dy out and dL/dx,
dL/dgate back. Only the time spent waiting on a transfer is exposed (stats.stage_seconds
["comm_wait"]).

Shape legend: T = tokens, S = selections per token, D = dim, W = EP members, M = nodes,
P1 / Q1 = (token, node) pairs / selections this rank sends to gateways, P1_in / Q1_in = what
this rank receives as a gateway, P2_in / Q2_in = what it receives as an owner.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from peer_dist.ops import ragged_mix
from peer_dist.parallel.comm import Exchange, send_async, send_two_async
from peer_dist.parallel.dispatch import (
    DispatchPlan,
    Received,
    ReturnPartials,
    SendTokens,
    _send_chunk,
    chunk_bounds,
    group_pairs,
    sum_chunk_grads,
    unpack,
)
from peer_dist.parallel.idmap import IdMap


class Routes:
    """Node of each EP member, the members of each node, and each member's gateways.

    nodes (W,) any node labels, members of a node consecutive (torchrun's rank order)."""

    def __init__(self, nodes: tuple[int, ...], block: int):
        labels = {n: b for b, n in enumerate(dict.fromkeys(nodes))}
        self.node = [labels[n] for n in nodes]  # (W,) node index in [0, M)
        self.members: list[list[int]] = [[] for _ in labels]
        self.index = []  # (W,) position within its node
        for j, b in enumerate(self.node):
            self.index.append(len(self.members[b]))
            self.members[b].append(j)
        self.block = block  # rows per owner

    @cached_property
    def gateway(self) -> list[list[int]]:
        """gateway[s][b]: the member of node b that relays s's tokens."""
        return [[m[self.index[s] % len(m)] for m in self.members] for s in range(self.size)]

    @property
    def size(self) -> int:
        return len(self.node)

    @property
    def num_nodes(self) -> int:
        return len(self.members)

    def first_row(self, node: int) -> int:
        """Position of the node's first row (its members' blocks are consecutive)."""
        return self.members[node][0] * self.block


def hop_splits(counts: list[list[int]], r: Routes, me: int) -> tuple[list[int], ...]:
    """From every member's counts (W, 2W + M) [pairs per owner, selections per owner, pairs per
    node], this member's eight split lists: hop 1 (send pairs, send selections, receive pairs,
    receive selections), then hop 2 the same."""
    w, mine = r.size, r.node[me]
    pairs = [c[:w] for c in counts]
    sels = [c[w:2 * w] for c in counts]
    node_pairs = [c[2 * w:] for c in counts]
    via_me = [s for s in range(w) if r.gateway[s][mine] == me]  # sources I relay for
    h1 = ([0] * w, [0] * w, [0] * w, [0] * w)
    for b, m in enumerate(r.members):  # I send to my gateway on every node
        g = r.gateway[me][b]
        h1[0][g], h1[1][g] = node_pairs[me][b], sum(sels[me][o] for o in m)
    for s in via_me:
        h1[2][s], h1[3][s] = node_pairs[s][mine], sum(sels[s][o] for o in r.members[mine])
    h2 = ([0] * w, [0] * w, [0] * w, [0] * w)
    for o in r.members[mine]:
        h2[0][o] = sum(pairs[s][o] for s in via_me)
        h2[1][o] = sum(sels[s][o] for s in via_me)
    for s in range(w):  # as an owner: what each gateway of my node relays to me
        g = r.gateway[s][mine]
        h2[2][g] += pairs[s][me]
        h2[3][g] += sels[s][me]
    return (*h1, *h2)


@dataclass
class NodePlan:
    hop1: DispatchPlan  # source -> gateways (rows: positions within the node)
    hop2: tuple[list[int], ...]  # gateway -> owners: send pairs, send sels, recv pairs, recv sels


def plan_node_dispatch(ids: torch.Tensor, idmap: IdMap, ex: Exchange, r: Routes) -> NodePlan:
    """Hop 1 grouped by (gateway, token), and both hops' splits (the one host sync)."""
    return plan_node_chunks(ids, idmap, ex, r, [(0, ids.shape[0])])[0]


def _node_counts(ids: torch.Tensor, idmap: IdMap, ex: Exchange, r: Routes):
    """One chunk's hop-1 grouping and its counts row (2W + M): pairs and selections per
    owner, pairs per node (through this member's gateway there)."""
    t, s = ids.shape
    pos = idmap.position(ids.reshape(-1))
    owner, _ = idmap.split(pos)  # (Q,)
    node = torch.tensor(r.node, device=ids.device)[owner]
    gateway = torch.tensor(r.gateway[ex.rank], device=ids.device)[node]
    first = torch.tensor([r.first_row(b) for b in range(r.num_nodes)], device=ids.device)
    token = torch.arange(t, device=ids.device).repeat_interleave(s)
    g = group_pairs(gateway, pos - first[node], token, t, ex.size)
    flat_pairs = torch.unique(owner * t + token)  # (token, owner) pairs: what hop 2 carries
    pair_count = torch.bincount(torch.div(flat_pairs, max(t, 1), rounding_mode="floor"),
                                minlength=ex.size)
    gw_of_node = torch.tensor(r.gateway[ex.rank], device=ids.device)
    mine = torch.cat([pair_count, torch.bincount(owner, minlength=ex.size),
                      g.pair_count[gw_of_node]])
    return g, mine


def plan_node_chunks(ids: torch.Tensor, idmap: IdMap, ex: Exchange, r: Routes,
                     bounds: list[tuple[int, int]]) -> list[NodePlan]:
    """A NodePlan per chunk of tokens [a, b); one count exchange for all (W, C (2W + M))."""
    parts = [_node_counts(ids[a:b], idmap, ex, r) for a, b in bounds]
    every = ex.gather_counts(torch.cat([mine for _, mine in parts]))
    width = 2 * ex.size + r.num_nodes
    plans = []
    for i, (g, _) in enumerate(parts):
        h = hop_splits([c[i * width:(i + 1) * width] for c in every], r, ex.rank)
        plans.append(NodePlan(DispatchPlan(g.order, g.pair_token, g.meta, *h[:4]), h[4:]))
    return plans


def plan_relay(got: Received, r: Routes, ex: Exchange, splits: tuple[list[int], ...]
               ) -> DispatchPlan:
    """At a gateway: the received selections (rows within the node, bag = received pair)
    regrouped by (owner, received pair) for hop 2."""
    first = r.members[r.node[ex.rank]][0]
    within = torch.div(got.rows, r.block, rounding_mode="floor")
    g = group_pairs(first + within, got.rows - within * r.block, got.bag, got.x.shape[0],
                    ex.size)
    return DispatchPlan(g.order, g.pair_token, g.meta, *splits)


@dataclass
class Relayed(Received):
    """What an owner holds after both hops, and what the way back needs."""

    hop1: DispatchPlan
    relayed_pairs: int  # P1_in: pairs this rank received as a gateway


class NodeDispatch:
    """The node-aware dispatch strategy's three stages for one EP group."""

    name = "node_dispatch"
    overlaps = True  # has overlapped(): parallel.overlap_chunks > 1 pipelines it

    def __init__(self, idmap: IdMap, ex: Exchange, act: str, table_scale: float = 1.0):
        self.idmap, self.ex, self.act, self.table_scale = idmap, ex, act, table_scale
        self.routes = Routes(ex.nodes, idmap.block)

    def input_dist(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> Relayed:
        plan = plan_node_dispatch(ids, self.idmap, self.ex, self.routes)
        x1, g1, rows1, bag1 = SendTokens.apply(x, gates, plan.hop1, self.ex)  # (P1_in, D)
        at_gateway = Received(x1, rows1, bag1, g1, plan.hop1)
        hop2 = plan_relay(at_gateway, self.routes, self.ex, plan.hop2)
        x2, g2, rows2, bag2 = SendTokens.apply(x1, g1, hop2, self.ex)  # (P2_in, D)
        return Relayed(x2, rows2, bag2, g2, hop2, plan.hop1, x1.shape[0])

    def compute(self, got: Relayed, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(P2_in, D) one partial per pair received from a gateway, from the local rows."""
        return ragged_mix(got.x, got.rows, got.bag, got.gates, u, v, self.act,
                          table_scale=self.table_scale)

    def output_dist(self, got: Relayed, y_in: torch.Tensor, tokens: int) -> torch.Tensor:
        y_relay = ReturnPartials.apply(y_in, got.plan, self.ex, got.relayed_pairs)  # (P1_in, D)
        return ReturnPartials.apply(y_relay, got.hop1, self.ex, tokens)  # (T, D)

    def overlapped(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                   u: torch.Tensor, v: torch.Tensor, chunks: int) -> torch.Tensor:
        """All stages over `chunks` chunks of tokens, transfers under relaying and compute."""
        bounds = chunk_bounds(x.shape[0], chunks)
        plans = plan_node_chunks(ids, self.idmap, self.ex, self.routes, bounds)
        return OverlappedNodeDispatch.apply(x, gates, u, v, plans, bounds, self, self.act)


@dataclass
class NodeChunk:
    """One chunk in flight: its plans, what the gateway relayed and the owner's mix graph."""

    hop1: DispatchPlan
    hop2: DispatchPlan | None = None
    relayed: int = 0  # P1_in: pairs this rank received as a gateway
    x: torch.Tensor | None = None  # (P2_in, D) at the owner (a leaf of the mix's graph)
    gates: torch.Tensor | None = None  # (Q2_in,)
    y: torch.Tensor | None = None  # (P2_in, D) the owner's partials


def _gather_back(parts: torch.Tensor, plan: DispatchPlan, n: int) -> torch.Tensor:
    """Rows that came back per pair, summed into their n positions (per token or relayed
    pair), as ReturnPartials sums them."""
    return parts.new_zeros(n, parts.shape[1]).index_add_(0, plan.pair_token, parts)


class OverlappedNodeDispatch(torch.autograd.Function):
    """(x (T, D), gates (T, S), u, v) -> y (T, D): node_dispatch over chunks, each chunk's
    hop 1 in flight while the previous chunk is relayed and mixed."""

    @staticmethod
    def forward(ctx, x, gates, u, v, plans: list[NodePlan], bounds, st: NodeDispatch,
                act: str):
        ex = st.ex
        chunks = [NodeChunk(p.hop1) for p in plans]

        def hop1(i: int):
            a, b = bounds[i]
            return _send_chunk(x, gates[a:b], chunks[i].hop1, a, ex)

        pending, back = hop1(0), []
        for i, c in enumerate(chunks):
            at_gateway = unpack(*pending.wait(), c.hop1)
            c.hop2 = plan_relay(at_gateway, st.routes, ex, plans[i].hop2)
            c.relayed = at_gateway.x.shape[0]
            second = _send_chunk(at_gateway.x, at_gateway.gates, c.hop2, 0, ex)
            if i + 1 < len(chunks):  # the next chunk crosses while this one is relayed, mixed
                pending = hop1(i + 1)
            got = unpack(*second.wait(), c.hop2)
            with torch.enable_grad():
                c.x, c.gates = got.x.requires_grad_(True), got.gates.requires_grad_(True)
                c.y = ragged_mix(c.x, got.rows, got.bag, c.gates, u, v, act,
                                 table_scale=st.table_scale)
            back.append(send_async(ex, c.y.detach(), c.hop2.recv_pairs, c.hop2.pair_splits,
                                   "fwd"))
        home = []
        for c, p in zip(chunks, back, strict=True):  # sums per relayed pair, then home
            summed = _gather_back(p.wait(), c.hop2, c.relayed)
            home.append(send_async(ex, summed, c.hop1.recv_pairs, c.hop1.pair_splits, "fwd"))
        y = x.new_zeros(x.shape)
        for (a, b), c, p in zip(bounds, chunks, home, strict=True):
            y[a:b] += _gather_back(p.wait(), c.hop1, b - a)
        ctx.chunks, ctx.bounds, ctx.ex, ctx.tables = chunks, bounds, ex, (u, v)
        ctx.g_shape = gates.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        dy, chunks, bounds, ex = dy.contiguous(), ctx.chunks, ctx.bounds, ctx.ex

        def out1(i: int):  # dL/dy of a chunk's tokens to their gateways, once per pair
            a = bounds[i][0]
            p = chunks[i].hop1
            return send_async(ex, dy[p.pair_token + a], p.pair_splits, p.recv_pairs, "bwd")

        pending, back, tables = out1(0), [], ([], [])
        for i, c in enumerate(chunks):
            dy1 = pending.wait()  # (P1_in, D) at the gateway
            out2 = send_async(ex, dy1[c.hop2.pair_token], c.hop2.pair_splits,
                              c.hop2.recv_pairs, "bwd")
            if i + 1 < len(chunks):
                pending = out1(i + 1)
            grads = torch.autograd.grad(c.y, [c.x, c.gates, *ctx.tables], out2.wait(),
                                        allow_unused=True)
            gx, gg = (g if g is not None else torch.zeros_like(t)
                      for g, t in zip(grads[:2], (c.x, c.gates), strict=True))
            back.append(send_two_async(ex, gx, c.hop2.recv_pairs, c.hop2.pair_splits,
                                       gg.contiguous(), c.hop2.recv_sels, c.hop2.sel_splits,
                                       "bwd"))
            for parts, g in zip(tables, grads[2:], strict=True):
                if g is not None:
                    parts.append(g)
        home = []
        for c, p in zip(chunks, back, strict=True):  # summed at the gateway, home
            pdx, dg = p.wait()
            dx1 = _gather_back(pdx, c.hop2, c.relayed)
            dg1 = dg.new_zeros(dg.shape).index_copy_(0, c.hop2.order, dg)  # (Q1_in,)
            home.append(send_two_async(ex, dx1, c.hop1.recv_pairs, c.hop1.pair_splits,
                                       dg1, c.hop1.recv_sels, c.hop1.sel_splits, "bwd"))
        dx = dy.new_zeros(dy.shape)
        dgates = dy.new_zeros(ctx.g_shape)
        for (a, b), c, p in zip(bounds, chunks, home, strict=True):
            pdx, dg = p.wait()
            dx[a:b] += _gather_back(pdx, c.hop1, b - a)
            dgates[a:b] = dg.new_zeros(dg.shape).index_copy_(0, c.hop1.order, dg).view(
                b - a, dgates.shape[1])
        return dx, dgates, *(sum_chunk_grads(p) for p in tables), None, None, None, None
