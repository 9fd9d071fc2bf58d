"""Step-time model of the PEER expert layer on a cluster: compute, traffic by link, exposure.

    python -m peer_dist.tools.cluster_model --cluster 8x8:h100          # every layout, ranked
    python -m peer_dist.tools.cluster_model --gpus 1,8,64,512 --cluster h100 --json

Per layer and step (forward + backward), per rank, for one EP x DP layout and strategy:
  compute   the bytes the mix kernels stream: per token, forward reads S rows of U and of V
            (2*S*D*e), backward reads them again and writes their gradients (4*S*D*e); the
            messages packed and unpacked (twice the bytes sent; not fetch's nor the in-place
            all-reduce's); with the optimizer, a lazy Adam update of the touched rows
            (parameter, gradient and two fp32 moments); at HBM bandwidth x the kernels'
            achieved fraction (an assumption until a GPU has measured it: HBM_FRACTION).
            Where measured (peer-bench dist on CPU ranks), also at their own rates: the bytes
            zeroed in new buffers (fresh_bytes: fetch's row gradients, replicated's dense
            gradients), fetch's rows gathered into new buffers (gathered_bytes) and the
            gradient sync's coalesce (sync_bytes); with C > 1 chunks, the chunks' row
            gradients summed (merge_bytes, at the streaming rate)
  intra     intra-node bytes (parallel/cost.py, by link) / NVLink bandwidth per GPU (the
            replicated all-reduce: at its own measured rate where there is one)
  inter     inter-node bytes / NIC bandwidth per GPU
  sync      table gradients over the DP replicas of a shard: the touched rows all-gathered, or
            the dense shard all-reduced, whichever moves fewer bytes (grad_sync.reduce_rows);
            over the NIC when the DP group spans nodes
  exposed   communication not hidden behind compute: all of it with one chunk; with C chunks
            the first chunk's share, or what exceeds compute
  step      compute + exposed + sync + one latency per collective
Flat all-to-alls (fetch, dispatch) use NVLink and NIC at once (the slower sets the time);
node_dispatch's two hops run one after the other (their times add).

Memory per rank: the table shard (parameters, two fp32 Adam moments, gradients of the touched
rows) and the layer's messages (x, partials and metadata both ways); the dense part is the
memory model's (peer-scale plan without --cluster).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from peer_dist import cli
from peer_dist.errors import UserError
from peer_dist.parallel import cost

GIB = 1024 ** 3
# The mix kernels' achieved fraction of HBM bandwidth: FBGEMM's embedding kernels reach 65%
# forward and 26.5% backward (with the fused optimizer); no GPU has measured ours yet.
HBM_FRACTION = 0.45
# The most GPUs a cluster may have: every EP (divisor of the world) is priced, in time that
# grows with the world (peer-scale plan at 65,536 GPUs: ~2 min); beyond it a count is a typo.
MAX_GPUS = 1 << 16


@dataclass
class Cluster:
    """A cluster's numbers, per GPU (bandwidths per direction)."""

    nodes: int
    gpus_per_node: int
    hbm_bytes_per_s: float
    intra_bytes_per_s: float  # NVLink, effective
    inter_bytes_per_s: float  # NIC, effective
    mem_bytes: float
    hbm_fraction: float = HBM_FRACTION
    latency_s: float = 20e-6  # per collective (launch and the split exchange's host sync)
    cores_per_rank: float = 0.0  # CPU machines: cores / ranks < 1 slows compute; 0 = no limit
    # plain streaming (dense gradients zeroed, summed, read): 0 = the kernels' rate. A CPU's
    # mix runs far below its copy bandwidth; a GPU's gather kernels and copies both sit near HBM
    stream_bytes_per_s: float = 0.0
    # fresh buffers written (zeroed gradients, gathered rows): a CPU pays the first touch of
    # newly mapped pages, ~10x below its streaming rate; 0 = stream_bytes_per_s
    fresh_bytes_per_s: float = 0.0
    # the gradient sync's coalesce of row gradients (sync_bytes); 0 = not priced (a
    # GPU's lazy optimizer reads the row gradients in its own pass: optimizer_bytes)
    sync_bytes_per_s: float = 0.0
    # ring bytes per second of the replicated baseline's in-place all-reduce; 0 = the links'
    allreduce_bytes_per_s: float = 0.0
    # rows gathered at random into a new buffer (fetch's owner): 0 = fresh_bytes_per_s
    gather_bytes_per_s: float = 0.0
    # fetch's sync (one row gradient per served row, from random rows of the whole shard):
    # 0 = sync_bytes_per_s
    sync_fetch_bytes_per_s: float = 0.0
    # seconds per selection of one grouping by (destination, token) (group_pairs: a sort),
    # GROUPINGS per step; 0 = not priced (a GPU sorts a step's selections in well under 1 ms)
    plan_s_per_selection: float = 0.0
    name: str = "custom"

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


# Effective bandwidths: HBM peak (the fraction applies on top), NVLink all-to-all ~370 GB/s on
# H100/H200 (of 450), one 400 Gb/s NIC per GPU ~50 GB/s (A100: 200 Gb/s, ~24 GB/s).
PRESETS = {
    "h100": dict(hbm_bytes_per_s=3.35e12, intra_bytes_per_s=370e9, inter_bytes_per_s=50e9,
                 mem_bytes=80 * GIB),
    "h200": dict(hbm_bytes_per_s=4.8e12, intra_bytes_per_s=370e9, inter_bytes_per_s=50e9,
                 mem_bytes=141e9),
    "a100": dict(hbm_bytes_per_s=2.0e12, intra_bytes_per_s=240e9, inter_bytes_per_s=24e9,
                 mem_bytes=80 * GIB),
}
CLUSTER_FORM = "NODESxGPUS:KIND (KIND one of h100, h200, a100) or a YAML file of Cluster fields"


def parse_cluster(text: str) -> Cluster:
    """'8x8:h100' or a YAML file with Cluster's fields (nodes, gpus_per_node, bandwidths)."""
    m = re.fullmatch(r"(\d+)x(\d+):(\w+)", text.strip())
    if m and m.group(3) in PRESETS and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return _bounded(text, Cluster(int(m.group(1)), int(m.group(2)), **PRESETS[m.group(3)],
                                      name=m.group(3)))
    if Path(text).is_file():
        return _bounded(text, _cluster_yaml(Path(text)))
    if text.endswith((".yaml", ".yml")):
        raise UserError(f"--cluster={text!r}: no such file; allowed is {CLUSTER_FORM}")
    raise UserError(f"--cluster={text!r}: allowed is {CLUSTER_FORM}")


def _bounded(text: str, c: Cluster) -> Cluster:
    """c, if its GPUs number at most MAX_GPUS."""
    if c.world > MAX_GPUS:
        raise UserError(f"--cluster={text!r}: {c.nodes} nodes x {c.gpus_per_node} GPUs = "
                        f"{c.world} GPUs is invalid: allowed are at most {MAX_GPUS} GPUs")
    return c


CLUSTER_NEEDS = ("nodes", "gpus_per_node", "hbm_bytes_per_s", "intra_bytes_per_s",
                 "inter_bytes_per_s", "mem_bytes")


def _cluster_yaml(path: Path) -> Cluster:
    from peer_dist.config import coerce, read_yaml  # their errors are UserErrors

    data = read_yaml(path, "--cluster file", "`nodes: 2` on a line of its own, per field")
    fields = Cluster.__dataclass_fields__
    if not isinstance(data, dict):
        data = {"(not a mapping)": data}
    bad = sorted(str(k) for k in data if k not in fields)
    need = set(CLUSTER_NEEDS)
    if bad or need - set(data):
        raise UserError(f"--cluster={path}: unknown keys {bad}, missing "
                        f"{sorted(need - set(data))}; allowed are {sorted(fields)}")
    values = {"name": path.stem}
    types = {"int": int, "float": float, "str": str}
    for key, value in data.items():
        values[key] = coerce(f"--cluster={path}: {key}", value, types[fields[key].type])
    for key, value in values.items():
        if key == "hbm_fraction":
            ok, allowed = 0 < value <= 1, "a fraction in (0, 1]"
        elif key in CLUSTER_NEEDS:
            ok, allowed = value > 0, "a number > 0"
        else:  # the measured rates and constants: 0 means not priced
            ok, allowed = key == "name" or value >= 0, "a number >= 0 (0: not priced)"
        if not ok:
            raise UserError(f"--cluster={path}: {key}={value!r} is invalid: allowed is {allowed}")
    return Cluster(**values)


@dataclass
class Layer:
    """One PEER layer's shape and batch per rank."""

    num_experts: int = 1024 ** 2
    dim: int = 1024
    selections: int = 128  # heads * topk
    tokens: int = 4096  # per rank per step
    elem: int = 2  # activations and rows (bf16)
    optimizer: bool = True  # count the lazy Adam update of touched rows


def mix_bytes(layer: Layer) -> float:
    """Bytes the mix streams per token, forward + backward (rows read twice, grads written)."""
    return 6.0 * layer.selections * layer.dim * layer.elem


def touched_rows(layer: Layer, ep: int) -> float:
    """Rows of one shard that an EP group's step touches (uniform ids)."""
    b = -(-layer.num_experts // ep)
    draws = ep * layer.tokens * layer.selections
    return b * (1.0 - (1.0 - 1.0 / layer.num_experts) ** draws)


def optimizer_bytes(layer: Layer, ep: int) -> float:
    """Lazy Adam over the touched rows of U and V: parameter r/w, gradient, two fp32 moments."""
    return touched_rows(layer, ep) * 2 * layer.dim * (3 * layer.elem + 16) if layer.optimizer \
        else 0.0


def distinct_rows(layer: Layer) -> float:
    """Distinct rows one rank's T*S selections name (uniform ids): R = N (1 - (1 - 1/N)^(T S))."""
    n = layer.num_experts
    return n * (1.0 - (1.0 - 1.0 / n) ** (layer.tokens * layer.selections))


def sync_bytes(layer: Layer, ep: int, strategy: str, chunks: int = 1) -> float:
    """Bytes the owner's gradient sync (grad_sync.sync_layer_grads) streams per rank and step,
    U and V. The kernels' row gradients arrive with each touched row once, in order (local,
    dispatch and node_dispatch; chunked, their chunks' gradients summed in the backward:
    merge_bytes): marked coalesced, nothing copied. Fetch's (one per served row, rows
    repeated across members) are coalesced: read what arrived (R_in = R on average, as each
    owner serves its 1/EP of every member's R) and write the touched rows. The 1/W of
    more than one rank costs no pass: the mix's backward folds it into each selection's weight
    (ShardedExperts.table_scale). The replicated baseline's gradients are dense: no sync."""
    if strategy != "fetch":
        return 0.0
    return (distinct_rows(layer) + touched_rows(layer, ep)) * 2 * layer.dim * layer.elem


def merge_bytes(layer: Layer, ep: int, strategy: str, chunks: int = 1) -> float:
    """Bytes dispatch's and node_dispatch's backward streams with C > 1 chunks to sum the
    chunks' row gradients into one tensor (dispatch.sum_chunk_grads), U and V: the union of
    their rows zeroed, and each chunk's rows (the rows T/C tokens touch) read and added
    (read and write). "local" is either at EP = 1, which runs the same chunked path."""
    if chunks <= 1 or strategy not in ("dispatch", "node_dispatch", "local"):
        return 0.0
    each = touched_rows(replace(layer, tokens=layer.tokens / chunks), ep)
    return (touched_rows(layer, ep) + 3 * chunks * each) * 2 * layer.dim * layer.elem


def fresh_bytes(layer: Layer, strategy: str) -> float:
    """Bytes a step zeroes in new buffers besides the mix's own, per rank: fetch's requester's
    row gradients are dense, zeroed before the mix sums into them (R x 2D); the replicated
    baseline zeroes dense gradients of both whole tables (2 N D)."""
    row = 2 * layer.dim * layer.elem  # a U row and a V row
    if strategy == "fetch":
        return distinct_rows(layer) * row
    if strategy == "replicated":
        return float(layer.num_experts) * row
    return 0.0


def gathered_bytes(layer: Layer, strategy: str) -> float:
    """Bytes fetch's owner gathers at random rows of its shard into new buffers per step
    (u[served], v[served]: R_in x 2D, R_in = R on average); none elsewhere."""
    return distinct_rows(layer) * 2 * layer.dim * layer.elem if strategy == "fetch" else 0.0


def _dp_crossings(c: Cluster, ep: int, dp: int) -> float:
    """Share of a DP group's ring hops (members ep apart) that leave a node."""
    if dp == 1:
        return 0.0
    node = [(k * ep) // c.gpus_per_node for k in range(dp)]
    return sum(node[k] != node[(k + 1) % dp] for k in range(dp)) / dp


def sync_time(layer: Layer, c: Cluster, ep: int, dp: int) -> tuple[float, float]:
    """(bytes each rank sends, seconds) to sum a shard's table gradients over its DP group."""
    if dp == 1:
        return 0.0, 0.0
    rows = touched_rows(layer, ep)
    shard = -(-layer.num_experts // ep)
    sparse = (dp - 1) * rows * (2 * layer.dim * layer.elem + 8)
    dense = 2.0 * (dp - 1) / dp * 2 * shard * (layer.dim + 1) * layer.elem
    sent = dense if rows * dp >= shard else sparse
    far = _dp_crossings(c, ep, dp)
    bw = far * c.inter_bytes_per_s + (1 - far) * c.intra_bytes_per_s if far < 1 \
        else c.inter_bytes_per_s
    return sent, sent / bw


# collectives per layer and step, (once, per chunk): the count exchanges (fetch's also sends
# its local ids), then each chunk's payloads. dispatch: x with its metadata out, partials
# back, dL/dy out, dL/dx with dL/dgates back (Exchange.send_two: one all-to-all for two
# tensors); node_dispatch: the same over two hops; fetch: U and V rows apart, and their
# gradients apart; replicated: U's and V's dense all-reduce. CommStats.collectives counts them
# groupings of a step's selections by (destination, token): dispatch's at the source (also
# with one rank: the layer runs the same stages), node_dispatch's at the source and the gateway
GROUPINGS = {"local": 1, "dispatch": 1, "node_dispatch": 2}
COLLECTIVES = {"fetch": (2, 4), "dispatch": (1, 4), "node_dispatch": (1, 8), "local": (0, 0),
               "replicated": (0, 2)}


def collectives(strategy: str, chunks: int = 1) -> int:
    """Collectives of one layer's step (forward + backward) with `chunks` chunks."""
    once, each = COLLECTIVES[strategy]
    return once + each * (1 if strategy == "replicated" else max(1, chunks))


def predict_step(layer: Layer, c: Cluster, ep: int, strategy: str, chunks: int = 1) -> dict:
    """The model's per-layer, per-rank figures for one layout (EP, DP = world / EP).
    strategy "replicated": every rank holds the whole tables, dense gradients all-reduced."""
    dp = c.world // ep
    shape = cost.LayerShape(layer.num_experts, layer.dim, layer.selections, layer.tokens, ep,
                            c.world, layer.elem, ranks_per_node=c.gpus_per_node)
    # EP = 1: dispatch's work is the local mix; fetch still gathers its rows (a world of one)
    strategy = "local" if ep == 1 and strategy in ("dispatch", "node_dispatch") else strategy
    intra, inter = (0.0, 0.0) if strategy == "local" else cost.predict_by_link(shape)[strategy]
    tables_ep = 1 if strategy == "replicated" else ep
    compute = _compute_s(layer, c, tables_ep, strategy, intra + inter, chunks)
    t_intra = layer.tokens * intra / c.intra_bytes_per_s
    t_inter = layer.tokens * inter / c.inter_bytes_per_s
    if strategy == "replicated" and c.allreduce_bytes_per_s:  # in place: its own measured rate
        t_intra, t_inter = (layer.tokens * b / c.allreduce_bytes_per_s for b in (intra, inter))
    comm = t_intra + t_inter if strategy == "node_dispatch" else max(t_intra, t_inter)
    exposed = comm if chunks <= 1 or strategy == "replicated" else max(comm - compute,
                                                                       comm / chunks)
    sync_bytes, sync = (0.0, 0.0) if strategy == "replicated" else sync_time(layer, c, ep, dp)
    calls = 0 if ep == 1 and strategy != "replicated" else (
        collectives(strategy, chunks) + (3 if dp > 1 else 0))
    step = compute + exposed + sync + calls * c.latency_s
    return dict(ep=ep, dp=dp, strategy=strategy, chunks=chunks, nodes=c.nodes,
                gpus=c.world, tokens_per_rank=layer.tokens,
                bytes_intranode_per_token_layer_predicted=intra,
                bytes_internode_per_token_layer_predicted=inter,
                sync_bytes_per_rank=sync_bytes, compute_s=compute, intra_s=t_intra,
                inter_s=t_inter, exposed_s=exposed, sync_s=sync, step_s_predicted=step,
                tokens_per_s_per_gpu_predicted=layer.tokens / step,
                peak_bytes_per_rank_predicted=expert_memory(layer, tables_ep, intra + inter))


def _compute_s(layer: Layer, c: Cluster, ep: int, strategy: str, sent: float,
               chunks: int = 1) -> float:
    """Seconds of a rank's own work per layer and step; sent = bytes per token to others."""
    slow = 1.0 if not c.cores_per_rank else max(1.0, 1.0 / c.cores_per_rank)
    kernel = c.hbm_bytes_per_s * c.hbm_fraction
    stream = c.stream_bytes_per_s or kernel
    # every message byte is also packed by its sender and unpacked by its receiver (gathers
    # and index_adds that stream memory): twice the bytes sent, per rank. Not fetch's: its
    # packing is the owner's gather and its unpacking the sync's coalesce, both priced below;
    # not the replicated all-reduce's either: it works in place
    packed = 0.0 if strategy in ("fetch", "replicated") else 2 * sent
    work = layer.tokens * (mix_bytes(layer) + packed) + optimizer_bytes(layer, ep)
    fresh = c.fresh_bytes_per_s or stream
    seconds = (work / kernel + fresh_bytes(layer, strategy) / fresh
               + gathered_bytes(layer, strategy) / (c.gather_bytes_per_s or fresh)
               + merge_bytes(layer, ep, strategy, chunks) / stream
               + GROUPINGS.get(strategy, 0) * layer.tokens * layer.selections
               * c.plan_s_per_selection)
    sync_rate = (c.sync_fetch_bytes_per_s if strategy == "fetch" else 0.0) or c.sync_bytes_per_s
    if sync_rate:
        seconds += sync_bytes(layer, ep, strategy, chunks) / sync_rate
    if strategy == "replicated" and not c.allreduce_bytes_per_s:
        # the dense gradients read by the all-reduce (2 N D); a measured all-reduce rate has
        # its reads and sums in it
        seconds += 2.0 * layer.num_experts * layer.dim * layer.elem / stream
    return seconds * slow


def expert_memory(layer: Layer, ep: int, bytes_per_token: float) -> float:
    """One layer's table shard (parameters, fp32 Adam moments, touched-row gradients) and its
    messages (what a rank sends is about what it receives: twice the bytes sent)."""
    shard = -(-layer.num_experts // ep) * 2 * layer.dim
    grads = touched_rows(layer, ep) * 2 * layer.dim * layer.elem
    return shard * (layer.elem + 8) + grads + 2 * layer.tokens * bytes_per_token


def layouts(layer: Layer, c: Cluster, chunks: int = 1) -> list[dict]:
    """Every EP (divisor of the world) x strategy, best predicted tokens/s per GPU first, the
    ones that fit in memory before the ones that do not."""
    rows = []
    for ep in [e for e in range(1, c.world + 1) if c.world % e == 0]:
        for strategy in _strategies(ep, c):
            row = predict_step(layer, c, ep, strategy, chunks)
            row["fits"] = row["peak_bytes_per_rank_predicted"] <= c.mem_bytes
            rows.append(row)
    rows.sort(key=lambda r: (not r["fits"], -r["tokens_per_s_per_gpu_predicted"]))
    return rows


def plan_layouts(c: Cluster, memory_rows: list[dict], seq_len: int, selections: int,
                 elem: int, chunks: int = 1) -> list[dict]:
    """peer-scale plan --cluster: for each EP, the memory model's best setting that fits
    (memory_rows come best first, with ep, micro_batch, layers, peak_bytes_per_rank_predicted)
    joined with the step model of each strategy at its tokens per rank. step_s_predicted is the
    PEER layers' part of a step (layers x one layer; the dense part is not modelled); ranked by
    predicted tokens/s per GPU."""
    best: dict[int, dict] = {}
    for m in memory_rows:
        if m["fits"] and m["ep"] not in best:
            best[m["ep"]] = m
    out = []
    for ep, m in best.items():
        layer = Layer(m["num_experts"], m["dim"], selections, m["micro_batch"] * seq_len, elem)
        for strategy in _strategies(ep, c):
            row = predict_step(layer, c, ep, strategy, chunks)
            layers = max(1, m["layers"])
            for k in ("compute_s", "intra_s", "inter_s", "exposed_s", "sync_s",
                      "step_s_predicted"):
                row[k] *= layers
            row.update(layers=m["layers"], micro_batch=m["micro_batch"],
                       zero_stage=m["zero_stage"], table_optimizer=m["table_optimizer"],
                       tokens_per_s_per_gpu_predicted=layer.tokens / row["step_s_predicted"],
                       peak_bytes_per_rank_predicted=m["peak_bytes_per_rank_predicted"],
                       fits=True)
            out.append(row)
    out.sort(key=lambda r: -r["tokens_per_s_per_gpu_predicted"])
    return out


def _strategies(ep: int, c: Cluster) -> list[str]:
    """What to price at an EP: local alone at 1; node_dispatch only when EP spans nodes."""
    if ep == 1:
        return ["local"]
    return [s for s in cost.SHARDED if s != "node_dispatch" or ep > c.gpus_per_node]


def why(row: dict) -> str:
    """The largest term of the step, in words."""
    parts = {"compute": row["compute_s"], "exposed comm": row["exposed_s"],
             "DP grad sync": row["sync_s"]}
    top = max(parts, key=parts.get)
    return f"{top} {parts[top] / row['step_s_predicted']:.0%}"


def print_table(rows: list[dict], top: int) -> None:
    head = (f"{'EP':>4} {'DP':>4} {'strategy':13} {'step ms':>8} {'compute':>8} {'intra':>8} "
            f"{'inter':>8} {'exposed':>8} {'sync':>8} {'tok/s/GPU':>10} {'mem GB':>7} "
            f"{'fits':>4}  bound by")
    print(head)
    print("-" * len(head))
    for r in rows[:top]:
        ms = [1e3 * r[k] for k in ("step_s_predicted", "compute_s", "intra_s", "inter_s",
                                   "exposed_s", "sync_s")]
        print(f"{r['ep']:>4} {r['dp']:>4} {r['strategy']:13} "
              + " ".join(f"{v:>8.2f}" for v in ms)
              + f" {r['tokens_per_s_per_gpu_predicted']:>10,.0f} "
              f"{r['peak_bytes_per_rank_predicted'] / 1e9:>7.1f} {'yes' if r['fits'] else 'no':>4}"
              f"  {why(r)}")


def scaled(c: Cluster, gpus: int) -> Cluster:
    """c with `gpus` GPUs: one node up to its size, then whole nodes."""
    if 1 <= gpus <= c.gpus_per_node:
        return replace(c, nodes=1, gpus_per_node=gpus)
    if gpus < 1 or gpus % c.gpus_per_node:
        raise UserError(f"--gpus {gpus}: allowed are 1 to {c.gpus_per_node} or multiples of "
                        f"{c.gpus_per_node}")
    return replace(c, nodes=gpus // c.gpus_per_node)


def parse(argv: list[str]) -> argparse.Namespace:
    p = cli.Parser(prog="python -m peer_dist.tools.cluster_model",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", default="8x8:h100", help=CLUSTER_FORM + "; with --gpus the "
                   "kind alone (h100) is enough")
    p.add_argument("--gpus", default="", help="comma-separated GPU counts: the best layout of "
                   "each (the README's table)")
    p.add_argument("--num-experts", type=int, default=Layer.num_experts)
    p.add_argument("--dim", type=int, default=Layer.dim)
    p.add_argument("--selections", type=int, default=Layer.selections, help="heads * topk")
    p.add_argument("--tokens", type=int, default=Layer.tokens, help="tokens per rank")
    p.add_argument("--chunks", type=int, default=1, help="overlap chunks per layer")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", action="store_true")
    p.add_argument("--from-bench", default=None, metavar="FILE",
                   help="the kernels' HBM fraction measured on this cluster's GPU: the JSON "
                        "rows of `peer-bench dist --json` run there (the mix probe's speed "
                        "over the bytes the model says it streams, against the preset's HBM)")
    return p.parse_args(argv)


def measured_fraction(path: str, c: Cluster) -> float:
    """The mix kernels' achieved fraction of c's HBM bandwidth, from peer-bench dist's JSON
    rows (other lines skipped): per measured row, the bytes the model says the mix streams per
    token over the probe's seconds per token; the median over the rows."""
    import statistics

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"--from-bench={path}: {e.strerror}") from None
    rates = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or r.get("source") != "measured":
            continue
        mix = (r.get("model_constants") or {}).get("mix_s_per_token")
        shape = [r.get(k) for k in ("num_experts", "dim", "heads", "topk", "tokens_per_rank")]
        if isinstance(mix, (int, float)) and 0 < mix < float("inf") and all(
                isinstance(v, int) and v > 0 for v in shape):
            n, d, h, k, t = shape
            rates.append(mix_bytes(Layer(n, d, h * k, t, elem=4, optimizer=False)) / mix)
    if not rates:
        raise UserError(f"--from-bench={path}: no measured peer-bench dist row with a "
                        "finite model_constants.mix_s_per_token > 0; allowed is the output of "
                        "`peer-bench dist --json`")
    return statistics.median(rates) / c.hbm_bytes_per_s


def main(argv: list[str] | None = None) -> None:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    layer = Layer(args.num_experts, args.dim, args.selections, args.tokens)
    try:
        spec = args.cluster if ":" in args.cluster or Path(args.cluster).is_file() \
            else f"1x8:{args.cluster}"
        c = parse_cluster(spec)
        source = "assumed"
        if args.from_bench:
            c = replace(c, hbm_fraction=measured_fraction(args.from_bench, c))
            source = f"measured: {args.from_bench}"
        if args.gpus:
            rows = [layouts(layer, scaled(c, int(g)), args.chunks)[0]
                    for g in args.gpus.split(",")]
        else:
            rows = layouts(layer, c, args.chunks)
    except (UserError, ValueError) as e:
        raise SystemExit(f"cluster_model: {e}") from None
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"cluster {c.name}: HBM {c.hbm_bytes_per_s / 1e12:.2f} TB/s x {c.hbm_fraction:.1%} "
          f"({source}), NVLink {c.intra_bytes_per_s / 1e9:.0f} GB/s, NIC "
          f"{c.inter_bytes_per_s / 1e9:.0f} GB/s per GPU; layer N={layer.num_experts}, "
          f"d={layer.dim}, S={layer.selections}, {layer.tokens} tokens per rank, bf16")
    print_table(rows, args.top if not args.gpus else len(rows))


if __name__ == "__main__":
    main()
