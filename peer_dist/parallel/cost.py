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
node_dispatch (hop 1 to one gateway per remote node, hop 2 inside the gateway's node):
    counts (W-1)*(2W+M)*8 (every member's counts, gathered)
    hop 1, all inter-node: as dispatch with P1_out (token, remote node) pairs, Q1_out selections
    hop 2, all intra-node: as dispatch with the (token, owner) pairs and selections whose
         owner is not the gateway that relays them (the source's own node: not itself)
replicated baseline: ring all-reduce of the dense U, V gradients (2*N*D*e bytes):
    2*(W-1)/W * 2NDe
R_out = distinct rows this rank asks of other owners, P_out = (token, other owner) pairs,
Q_out = selections held by other owners; *_in are the same counts seen from the owner. Over a
group sum(R_in) = sum(R_out) (and so on), so the per-rank formulas below, written with the
"out" counts only, add up to the exact group total.

Links: every byte above is attributed to one (source, destination) pair of members, so it is
split into intra-node and inter-node bytes by the two members' nodes (by_link). Per rank, the
split is exact for what the rank sends itself; the traffic it causes elsewhere (the partials an
owner returns, what a gateway relays) is attributed to its source, so the group totals are
exact.

The choice between the strategies is made here too (choose_strategy): from the ids each rank
holds, the EP group's total bytes of each by link, one small all_reduce, the cheapest with
inter-node bytes weighted INTERNODE_COST times intra-node ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from peer_dist.parallel.idmap import IdMap
from peer_dist.parallel.node_dispatch import Routes

ID_BYTES = 4  # local row ids travel as int32
COUNT_BYTES = 8  # split counts travel as int64
# What a byte across nodes costs against one inside a node, for the automatic choice: an H100 or
# H200 node's NVLink (~450 GB/s per GPU and direction) over one 400 Gb/s NIC per GPU (50 GB/s).
INTERNODE_COST = 8.0


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


@functools.lru_cache(maxsize=256)
def block_rows(num_experts: int, ep: int) -> tuple[int, ...]:
    """Rows per owner in the torch.chunk layout (the last owners may hold fewer, or none)."""
    b = -(-num_experts // ep)
    return tuple(max(0, min(b, num_experts - r * b)) for r in range(ep))


@functools.lru_cache(maxsize=4096)
def _owners_touched(n: int, ep: int, selections: int) -> float:
    return sum(1.0 - (1.0 - b / n) ** selections for b in block_rows(n, ep))


def expected_distinct(num: int, draws: float) -> float:
    """E[distinct values] among `draws` uniform draws from `num` values."""
    return num * (1.0 - (1.0 - 1.0 / num) ** draws)


@dataclass(frozen=True)  # hashable: predict_by_link caches by shape
class LayerShape:
    num_experts: int
    dim: int
    selections: int  # heads * topk
    tokens: int  # per rank, per step
    ep: int
    world: int
    elem: int = 4  # bytes per element (4 fp32, 2 bf16)
    ranks_per_node: int = 0  # 0 = every rank on one node

    def owners_touched(self) -> float:
        """E[owners holding at least one of a token's S uniform selections]."""
        return _owners_touched(self.num_experts, self.ep, self.selections)

    def routes(self) -> Routes:
        """The EP group of ranks 0..EP-1: member j on node j // ranks_per_node."""
        local = self.ranks_per_node or self.world
        return Routes(tuple(j // local for j in range(self.ep)), -(-self.num_experts // self.ep))

    def nodes(self) -> int:
        """Nodes of the whole world."""
        return self.world // (self.ranks_per_node or self.world)


@dataclass
class Counts:
    """What one rank sends in one step, by destination: the inputs of by_link."""

    rows: list[float]  # (W,) distinct rows asked of each owner (fetch)
    pairs: list[float]  # (W,) (token, owner) pairs
    sels: list[float]  # (W,) selections held by each owner
    node_pairs: list[float]  # (M,) (token, node) pairs


def count_bytes(strategy: str, r: Routes) -> int:
    """Bytes of split counts one member sends each other member, one step."""
    return {"fetch": COUNT_BYTES, "dispatch": 2 * COUNT_BYTES,
            "node_dispatch": COUNT_BYTES * (2 * r.size + r.num_nodes)}[strategy]


def by_link(strategy: str, c: Counts, me: int, r: Routes, dim: int,
            elem: int) -> tuple[float, float]:
    """(intra-node, inter-node) bytes that member `me` sends or causes, one step, fwd + bwd."""
    w, here = r.size, r.node[me]
    per_pair, per_sel = 4 * dim * elem, meta_bytes(elem) + elem
    out = [0.0, 0.0]  # intra, inter
    count_row = count_bytes(strategy, r)
    for j in range(w):
        if j != me:
            out[r.node[j] != here] += count_row
    if strategy == "fetch":
        for j in range(w):
            if j != me:
                out[r.node[j] != here] += c.rows[j] * (ID_BYTES + 4 * dim * elem)
    elif strategy == "dispatch":
        for j in range(w):
            if j != me:
                out[r.node[j] != here] += c.pairs[j] * per_pair + c.sels[j] * per_sel
    else:
        for b, members in enumerate(r.members):  # hop 1: to the gateway of each remote node
            if b != here:
                out[1] += c.node_pairs[b] * per_pair + sum(c.sels[o] for o in members) * per_sel
        for o in range(w):  # hop 2: gateway -> owner, inside the owner's node
            if o != r.gateway[me][r.node[o]]:
                out[0] += c.pairs[o] * per_pair + c.sels[o] * per_sel
    return out[0], out[1]


def mean_by_link(strategy: str, c: Counts, r: Routes, dim: int,
                 elem: int) -> tuple[float, float]:
    """The mean over members of by_link(strategy, c, me, ...) when every member holds the same
    Counts c (expected_counts), in O(W) rather than by_link's O(W) per member: a byte bound for
    member j is sent by each of the other members, by those on j's node over NVLink."""
    w = r.size
    per_pair, per_sel = 4 * dim * elem, meta_bytes(elem) + elem
    size = [len(r.members[b]) for b in r.node]  # (W,) members of each member's node
    count_row = count_bytes(strategy, r)
    intra = count_row * sum(n - 1 for n in size)
    inter = count_row * sum(w - n for n in size)
    x = [p * per_pair + q * per_sel for p, q in zip(c.pairs, c.sels, strict=True)]  # per owner
    if strategy in ("fetch", "dispatch"):
        if strategy == "fetch":
            x = [rows * (ID_BYTES + 4 * dim * elem) for rows in c.rows]
        intra += sum(xj * (n - 1) for xj, n in zip(x, size, strict=True))
        inter += sum(xj * (w - n) for xj, n in zip(x, size, strict=True))
        return intra / w, inter / w
    for b, members in enumerate(r.members):  # hop 1: every member outside node b sends there
        hop1 = c.node_pairs[b] * per_pair + sum(c.sels[o] for o in members) * per_sel
        inter += hop1 * (w - len(members))
    # hop 2: every member sends each owner's share unless the owner is its own gateway there;
    # member s's gateway on node b is b's member index[s] mod |b|
    at_index = [0] * (max(size) if size else 0)  # members at each position within a node
    for i in r.index:
        at_index[i] += 1
    relayed_by_self = sum(x[m[i % len(m)]] * k for m in r.members for i, k in enumerate(at_index))
    intra += w * sum(x) - relayed_by_self
    return intra / w, inter / w


def source_counts(ids: torch.Tensor, idmap: IdMap, r: Routes) -> Counts:
    """The Counts of a rank holding ids (T, S), counted from the ids."""
    t, s = ids.shape
    w, tt = r.size, max(t, 1)
    pos = idmap.position(ids.reshape(-1))
    owner, _ = idmap.split(pos)
    token = torch.arange(t, device=ids.device).repeat_interleave(s)
    node = torch.tensor(r.node, device=ids.device, dtype=torch.int64)[owner]
    rows = torch.bincount(idmap.split(torch.unique(pos))[0], minlength=w)
    pairs = torch.bincount(torch.unique(owner * t + token) // tt, minlength=w)
    node_pairs = torch.bincount(torch.unique(node * t + token) // tt, minlength=r.num_nodes)
    return Counts(rows.tolist(), pairs.tolist(), torch.bincount(owner, minlength=w).tolist(),
                  node_pairs.tolist())


def expected_counts(shape: LayerShape, r: Routes) -> Counts:
    """The Counts of any rank for uniform random ids (the same for every rank)."""
    n, s, t = shape.num_experts, shape.selections, shape.tokens
    blocks = block_rows(n, shape.ep)
    node_rows = [sum(blocks[o] for o in m) for m in r.members]
    fresh = 1.0 - (1.0 - 1.0 / n) ** (t * s)  # P(a row is selected at least once)
    return Counts([b * fresh for b in blocks],
                  [t * (1.0 - (1.0 - b / n) ** s) for b in blocks],
                  [t * s * b / n for b in blocks],
                  [t * (1.0 - (1.0 - nb / n) ** s) for nb in node_rows])


SHARDED = ("fetch", "dispatch", "node_dispatch")


def predict_by_link(shape: LayerShape) -> dict[str, tuple[float, float]]:
    """(intra-node, inter-node) bytes per token per layer and step, mean over ranks, of each
    strategy and of the replicated baseline, for uniform random expert ids."""
    return dict(_by_link(shape))


@functools.lru_cache(maxsize=4096)  # O(EP) each: peer-scale plan asks the same shape per
def _by_link(shape: LayerShape) -> tuple:  # ZeRO stage and optimizer, and --min-gpus again
    r, t = shape.routes(), shape.tokens
    out = {}
    counts = expected_counts(shape, r)
    for strategy in SHARDED:
        if shape.ep == 1:
            out[strategy] = (0.0, 0.0)
            continue
        intra, inter = mean_by_link(strategy, counts, r, shape.dim, shape.elem)
        out[strategy] = (intra / t, inter / t)
    rep = replicated_bytes(shape.num_experts, shape.dim, shape.world, shape.elem) / t
    # a ring in rank order crosses nodes M times out of W hops
    m = shape.nodes()
    far = rep * m / shape.world if m > 1 else 0.0
    out["replicated"] = (rep - far, far)
    return tuple(out.items())


def predict_per_token(shape: LayerShape) -> dict[str, float]:
    """Bytes per token per layer and step each strategy sends, for uniform random expert ids
    (intra- and inter-node together; predict_by_link splits them)."""
    return {k: a + b for k, (a, b) in predict_by_link(shape).items()}


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


def predicted_links(ids: torch.Tensor, idmap: IdMap, me: int, r: Routes, dim: int,
                    elem: int) -> dict[str, tuple[float, float]]:
    """{strategy: (intra, inter) bytes} this rank would send or cause this step, from its ids;
    node_dispatch only where the group spans several nodes (on one it is dispatch and more)."""
    c = source_counts(ids, idmap, r)
    names = SHARDED if r.num_nodes > 1 else SHARDED[:2]
    return {k: by_link(k, c, me, r, dim, elem) for k in names}


def choose_strategy(ids: torch.Tensor, idmap: IdMap, me: int, r: Routes, dim: int, elem: int,
                    group) -> str:
    """"local" at EP = 1, else the strategy with the fewest bytes over the whole EP group, a
    byte across nodes counted INTERNODE_COST times; identical on every rank of the group (each
    knows its own traffic: one tiny all_reduce)."""
    if r.size == 1:
        return "local"
    links = predicted_links(ids, idmap, me, r, dim, elem)
    est = torch.tensor([a + INTERNODE_COST * b for a, b in links.values()], dtype=torch.float64,
                       device=ids.device)
    dist.all_reduce(est, group=group)
    return list(links)[int(torch.argmin(est))]
