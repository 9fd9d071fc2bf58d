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

No overlap (parallel.overlap_chunks > 1 is a config error with this strategy, and under auto a
step that picks it runs unchunked): a chunk here is four dependent transfers each way (hop 1,
hop 2, the partials to the gateway, the sums home) with the gateway's regrouping (plan_relay,
which needs hop 1's data) between them, so a pipeline would have to interleave the stages of
three chunks at once, and its backward could not reuse SendTokens / ReturnPartials (their
transfers wait) but would restate both hops by hand. Left until a NIC-bound cluster can measure
whether the hidden time pays for that.

Shape legend: T = tokens, S = selections per token, D = dim, W = EP members, M = nodes,
P1 / Q1 = (token, node) pairs / selections this rank sends to gateways, P1_in / Q1_in = what
this rank receives as a gateway, P2_in / Q2_in = what it receives as an owner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peer_dist.ops import ragged_mix
from peer_dist.parallel.comm import Exchange
from peer_dist.parallel.dispatch import (
    DispatchPlan,
    Received,
    ReturnPartials,
    SendTokens,
    group_pairs,
)
from peer_dist.parallel.idmap import IdMap


class Routes:
    """Node of each EP member, the members of each node, and each member's gateways.

    nodes (W,) any node labels, members of a node consecutive (torchrun's rank order)."""

    def __init__(self, nodes: tuple[int, ...], block: int):
        labels = list(dict.fromkeys(nodes))
        self.node = [labels.index(n) for n in nodes]  # (W,) node index in [0, M)
        self.members = [[j for j, n in enumerate(self.node) if n == b] for b in range(len(labels))]
        self.index = [self.members[n].index(j) for j, n in enumerate(self.node)]  # within node
        self.block = block  # rows per owner
        # gateway[s][b]: the member of node b that relays s's tokens
        self.gateway = [[m[self.index[s] % len(m)] for m in self.members]
                        for s in range(len(nodes))]

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
    h = hop_splits(ex.gather_counts(mine), r, ex.rank)
    return NodePlan(DispatchPlan(g.order, g.pair_token, g.meta, *h[:4]), h[4:])


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
    overlaps = False  # two hops per chunk: see the module docstring

    def __init__(self, idmap: IdMap, ex: Exchange, act: str):
        self.idmap, self.ex, self.act = idmap, ex, act
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
        return ragged_mix(got.x, got.rows, got.bag, got.gates, u, v, self.act)

    def output_dist(self, got: Relayed, y_in: torch.Tensor, tokens: int) -> torch.Tensor:
        y_relay = ReturnPartials.apply(y_in, got.plan, self.ex, got.relayed_pairs)  # (P1_in, D)
        return ReturnPartials.apply(y_relay, got.hop1, self.ex, tokens)  # (T, D)
