"""Per-rank memory model of a sharded PEER training run: pure arithmetic.

Shape legend: N = experts (table rows), d = model dim (= table width), L = PEER layers,
E = expert-parallel degree, W = world size, T = tokens per rank per micro-batch,
S = heads * topk selections per token, P = dense parameters, e = bytes per element.

What is exact and what is an estimate:
  expert params     exact: every PEER layer has two N x d tables (U, V); rank r of an EP group
                    holds rows [r*b, (r+1)*b) with b = ceil(N / E) (the torch.chunk layout), so
                    the largest shard, the one that decides whether a run fits, has b rows:
                    b * d * 2 tables * L * e_table (model.peer.table_dtype: fp32 by default,
                    also when the dense part trains in bf16; or bf16).
  table optimizer   exact: lazy_adam / dense_adam keep two moments per entry, adagrad one
                    accumulator per row, sgd nothing; each value e_state bytes (fp32, or bf16
                    with table_state_dtype = optim.table_state_dtype).
  expert grads      an estimate: gradients are row-sparse (COO, coalesced), so they hold only the
                    rows touched in a step, bounded by min(b, expected unique selections):
                    under uniform routing every token draws S rows afresh, b * (1 - (1 -
                    1/N)^(T*W*S)) rows, each d values plus an int64 index: the upper estimate,
                    what `plan` assumes. A run's tokens repeat themselves: the T tokens of
                    each of W ranks make fewer distinct queries, D = min(T W, K T^beta
                    W^gamma N^delta) (a Heaps' law of the routing), and draw D * S rows. K
                    and the exponents are measured (`fit_routing` on the calibration grid's
                    counted rows, comm/<layer>/grad_rows); the fetch and grad-sync terms count
                    rows the same way (Setup.routing). Given one run's count, `routing_for`
                    finds its K.
  dense part        exact parameter count (attention, dense FFWs, routers, embeddings); bytes
                    per parameter as DeepSpeed ZeRO counts them (see `dense_bytes_per_param`),
                    plus ZeRO's gradient-reduction buckets (see `bucket_bytes`).
  activations       per token, the tensors this transformer saves for backward (counted with
                    autograd's saved-tensor hooks) plus the backward's transient: one block's
                    gradients and the loss's softmax, and per selection the index scratch of
                    routing, grouping and dispatch (measured constants, SELECTION_SCRATCH).
  all-to-all        bytes moved per step from peer_dist/parallel/cost.py; the buffers one PEER
                    layer holds while it exchanges, plus what each layer keeps for backward
                    (see `a2a_bytes`; fetch's from what parallel/fetch.py allocates). Zero at
                    E = 1.
  query BN (W > 1)  the router's BatchNorm with global statistics (parallel/batchnorm.py) runs
                    its backward sums in float64: a transient of the activations (see
                    `sync_bn_bytes`).
  grad sync         the sum of a shard's row-sparse gradient over its DP replicas
                    (parallel/grad_sync.reduce_rows) runs after backward, when activations are
                    freed: only what it holds beyond them counts (see `grad_sync_bytes`).
  runtime           measured, not modelled: what a rank holds beyond the terms above (the
                    interpreter, torch, DeepSpeed, the communicators, kernels, allocator pools),
                    one constant per (machine, versions, config, world size, ZeRO stage, dtype);
                    on CUDA, what max_memory_allocated sees beyond them.
The sum of all terms is the whole peak per rank; the modelled terms are all but the runtime.

Measured constants (the runtime per group, SELECTION_SCRATCH per strategy, the routing law's K
and exponents) are fitted by `peer-scale calibrate` on a calibration grid (`fit_calibration`: least
squares of measured peak minus the other terms; `fit_routing`: of the counted gradient rows);
`peer-scale measure` with no grid arguments reports accuracy on a disjoint validation grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from peer_dist.config import BN_SYNC, TABLE_OPTIMIZERS, ModelConfig, OptimConfig, ParallelConfig
from peer_dist.config import STRATEGIES as PARALLEL_STRATEGIES
from peer_dist.parallel import cost
from peer_dist.train.deepspeed_setup import bucket_elements  # noqa: F401 (re-exported)

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
STRATEGIES = tuple(s for s in PARALLEL_STRATEGIES if s != "auto")  # what the model prices
ZERO_STAGES = (0, 1, 2, 3)
DEVICES = ("cpu", "cuda")
INDEX_BYTES = 8  # int64 row ids (COO indices, ids sent to owners)


@dataclass
class Setup:
    """One point of a scaling study: a model and how it is trained and spread over ranks."""

    model: ModelConfig = field(default_factory=ModelConfig)
    ep: int = 1
    world_size: int = 1
    dtype: str = "fp32"  # dense part, activations, messages
    table_dtype: str = "fp32"  # the expert tables (model.peer.table_dtype)
    table_optimizer: str = "lazy_adam"
    table_state_dtype: str = "fp32"  # the table optimizer's moments / accumulator
    table_bias_correction: str = OptimConfig.table_bias_correction  # "row": an int32 per row
    bn_sync: str = ParallelConfig.bn_sync  # the router's query BN: global statistics or local
    zero_stage: int = 0
    strategy: str = "dispatch"
    tokens_per_rank: int = 1024  # per micro-batch
    runtime_bytes: int = 0  # the runtime's own baseline (calibrated per machine, or given)
    device: str = "cpu"  # cpu (peak RSS) | cuda (the allocator's peak)
    # bytes per selection and PEER layer by kind (local | fetch | dispatch); None: the stored
    # SELECTION_SCRATCH. A calibration file's values when one is given.
    scratch: dict[str, int] | None = None
    # routing of the row-counting terms: (K, beta, gamma, delta), the T tokens of each of W
    # ranks make D = min(T W, K T^beta W^gamma N^delta) distinct queries (distinct_queries);
    # None: every token its own (uniform routing, the upper estimate). Fitted by calibrate
    # (fit_routing), or one run's (routing_for).
    routing: tuple[float, ...] | None = None

    def validate(self) -> Setup:
        self.model.validate()
        checks = [
            (self.ep >= 1 and self.world_size % self.ep == 0, "ep", self.ep,
             f"a divisor of world_size={self.world_size}"),
            (self.world_size >= 1, "world_size", self.world_size, "an integer >= 1"),
            (self.dtype in DTYPE_BYTES, "dtype", self.dtype, f"one of {list(DTYPE_BYTES)}"),
            (self.table_dtype in DTYPE_BYTES, "table_dtype", self.table_dtype,
             f"one of {list(DTYPE_BYTES)}"),
            (self.table_state_dtype in DTYPE_BYTES, "table_state_dtype",
             self.table_state_dtype, f"one of {list(DTYPE_BYTES)}"),
            (self.table_optimizer in TABLE_OPTIMIZERS, "table_optimizer", self.table_optimizer,
             f"one of {list(TABLE_OPTIMIZERS)}"),
            (self.zero_stage in ZERO_STAGES, "zero_stage", self.zero_stage,
             f"one of {list(ZERO_STAGES)}"),
            (self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {list(STRATEGIES)}"),
            (self.tokens_per_rank >= 1, "tokens_per_rank", self.tokens_per_rank, ">= 1"),
            (self.device in DEVICES, "device", self.device, f"one of {list(DEVICES)}"),
            (self.bn_sync in BN_SYNC, "bn_sync", self.bn_sync, f"one of {list(BN_SYNC)}"),
            (self.model.sparse_kind == "peer", "model.sparse_kind", self.model.sparse_kind,
             "peer (the memory model prices PEER layers; MoE and PKM baselines are dense)"),
        ]
        for ok, key, value, allowed in checks:
            if not ok:
                raise ValueError(f"{key}={value!r} is invalid: allowed is {allowed}")
        return self

    # Short names used by every formula below.
    @property
    def n(self) -> int:
        return self.model.peer.num_experts

    @property
    def d(self) -> int:
        return self.model.dim

    @property
    def layers(self) -> int:
        return len(self.model.peer_block_ids())

    @property
    def elem(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def table_elem(self) -> int:
        return DTYPE_BYTES[self.table_dtype]

    @property
    def selections(self) -> int:
        return self.model.peer.heads * self.model.peer.topk


# --------------------------------------------------------------------------- expert tables

def rows_per_rank(num_experts: int, ep: int) -> int:
    """Rows of the largest shard: ceil(N / E) (torch.chunk; later ranks may hold fewer)."""
    return -(-num_experts // ep)


def expected_unique(pool: int, draws: float) -> float:
    """Expected number of distinct values among `draws` uniform draws from `pool` values."""
    if pool <= 0 or draws <= 0:
        return 0.0
    # pool * (1 - (1 - 1/pool)^draws), written to stay accurate for pool ~ 1e6 and up
    return pool * -math.expm1(draws * math.log1p(-1.0 / pool))


def distinct_queries(s: Setup, ranks: int) -> float:
    """How many distinct queries the T tokens of each of `ranks` ranks make together: all of
    them under uniform routing, else K * T^beta * ranks^gamma * N^delta (Setup.routing), at
    most all of them."""
    tokens = float(s.tokens_per_rank * ranks)
    if s.routing is None:
        return tokens
    k, beta, gamma, delta = s.routing
    return min(tokens, k * float(s.tokens_per_rank) ** beta * float(ranks) ** gamma
               * float(s.n) ** delta)


def selected_rows(s: Setup, ranks: int) -> float:
    """Expected distinct rows of all N that the tokens of `ranks` ranks select (S rows per
    query)."""
    return expected_unique(s.n, distinct_queries(s, ranks) * s.selections)


# The routing law's exponents where the points fitted do not vary a factor, and those under
# which routing_for solves a run's K before any fit: Heaps' law of text for a rank's tokens
# (beta), ranks reading apart (gamma: their queries add up), no dependence on N (delta).
DEFAULT_ROUTING = (0.5, 1.0, 0.0)


def routing_for(s: Setup, grad_rows: float) -> tuple[float, ...] | None:
    """The routing law under which touched_rows(s) equals a run's measured rows of its
    shard's gradient: the exponents as s.routing has them (else DEFAULT_ROUTING), K solved.
    None (uniform routing) when the run touched as many rows as uniform routing would, or
    more."""
    exps = tuple(s.routing[1:]) if s.routing else DEFAULT_ROUTING
    if grad_rows >= touched_rows(replace(s, routing=None)):
        return None
    beta, gamma, delta = exps
    lo = 1e-12  # D = every token at hi:
    hi = float(s.tokens_per_rank) ** (1 - beta) * float(s.world_size) ** (1 - gamma) \
        / float(s.n) ** delta
    for _ in range(200):  # touched_rows grows with K
        mid = math.sqrt(lo * hi)
        if touched_rows(replace(s, routing=(mid, *exps))) < grad_rows:
            lo = mid
        else:
            hi = mid
    return (hi, *exps)


def implied_queries(s: Setup, grad_rows: float) -> float | None:
    """The distinct queries D that make touched_rows(s) equal grad_rows (the inverse of
    expected_unique); None when the count is at the shard's size (saturated: D unknown)."""
    rows = rows_per_rank(s.n, s.ep)
    frac = grad_rows / rows
    if frac >= 0.98 or frac <= 0:
        return None
    return math.log1p(-frac) / math.log1p(-1.0 / s.n) / s.selections


def fit_routing(setups: list[Setup], grad_rows: list[float | None]) -> tuple[float, ...]:
    """(K, beta, gamma, delta) of the routing law D = K T^beta W^gamma N^delta (T tokens per
    rank, W ranks, N rows): least squares of log D over the points whose counted rows are
    informative (below the shard's size). An exponent whose factor does not vary among them
    keeps its DEFAULT_ROUTING value; T must vary (two or more token counts)."""
    import numpy as np

    pts = [(s, implied_queries(s, g)) for s, g in zip(setups, grad_rows, strict=True) if g]
    pts = [(s, q) for s, q in pts if q]
    if len({s.tokens_per_rank for s, _ in pts}) < 2:
        raise ValueError(f"fit_routing: {len(pts)} points with counted rows below their "
                         "shard's size, at fewer than 2 token counts (allowed: 2 or more)")
    factors = np.log([[s.tokens_per_rank, s.world_size, s.n] for s, _ in pts])
    y = np.log([q for _, q in pts])
    exps = np.array(DEFAULT_ROUTING, float)
    free = np.ptp(factors, axis=0) > 0
    fixed = factors[:, ~free] @ exps[~free]
    x = np.column_stack([np.ones(len(pts)), factors[:, free]])
    sol = np.linalg.lstsq(x, y - fixed, rcond=None)[0]
    exps[free] = sol[1:]
    return (float(math.exp(sol[0])), *map(float, exps))


def expert_param_bytes(s: Setup) -> int:
    return rows_per_rank(s.n, s.ep) * s.d * 2 * s.layers * s.table_elem


def table_state_bytes(s: Setup) -> int:
    rows = rows_per_rank(s.n, s.ep)
    per_table = {"lazy_adam": 2 * rows * s.d, "dense_adam": 2 * rows * s.d,
                 "adagrad": rows, "sgd": 0}[s.table_optimizer]
    row_steps = 4 * rows if (s.table_optimizer == "lazy_adam"
                             and s.table_bias_correction == "row") else 0
    return (per_table * DTYPE_BYTES[s.table_state_dtype] + row_steps) * 2 * s.layers


def touched_rows(s: Setup) -> float:
    """Expected rows of this rank's shard that get a gradient in one step (per table, layer):
    every rank's tokens (T*W*S draws) can select a row, and the owner sums them all."""
    rows = rows_per_rank(s.n, s.ep)
    return min(float(rows), rows * selected_rows(s, s.world_size) / s.n)


def expert_grad_bytes(s: Setup) -> int:
    return int(touched_rows(s) * (s.d * s.table_elem + INDEX_BYTES)) * 2 * s.layers


# --------------------------------------------------------------------------- dense part

def dense_param_count(m: ModelConfig) -> int:
    """Parameters outside the expert tables (what DeepSpeed trains), exactly as transformer.py
    builds them: embeddings, head, norms, attention, dense FFWs, PEER routers."""
    d, p = m.dim, m.peer
    peer_ids = set(m.peer_block_ids())
    q = p.heads * p.d_key
    key_sets = 1 if p.shared_keys else p.heads
    router = d * q + (2 * q if p.query_batchnorm else 0) + key_sets * 2 * math.isqrt(
        p.num_experts) * (p.d_key // 2)
    ffw = 2 * d * m.ffw_mult * d
    blocks = sum(2 * d + 4 * d * d + (router if i in peer_ids else ffw)
                 for i in range(m.n_layers))
    return 2 * m.vocab_size * d + d + blocks


def dense_bytes_per_param(dtype: str, zero_stage: int, world_size: int) -> float:
    """Per-rank bytes per dense parameter (params + grads + AdamW state) under ZeRO.

    bf16 (mixed precision): 2 B param + 2 B grad + 12 B fp32 state (master copy, m, v).
    fp32: 4 B param + 4 B grad + 8 B state (m, v) at stage 0; at stages 1-3 DeepSpeed's ZeRO
    optimizer keeps its own fp32 copy of the partition even when the params are fp32, so the
    state is 12 B there too. Stage 1 partitions the state over the W data-parallel ranks,
    stage 2 also the grads, stage 3 also the params.
    """
    param, grad = (2.0, 2.0) if dtype == "bf16" else (4.0, 4.0)
    state = 8.0 if dtype == "fp32" and zero_stage == 0 else 12.0
    w = float(world_size)
    if zero_stage >= 1:
        state /= w
    if zero_stage >= 2:
        grad /= w
    if zero_stage >= 3:
        param /= w
    return param + grad + state


def dense_bytes(s: Setup) -> int:
    return int(dense_param_count(s.model) * dense_bytes_per_param(s.dtype, s.zero_stage,
                                                                  s.world_size)
               + bucket_bytes(s))


def bucket_bytes(s: Setup) -> int:
    """ZeRO 1-2: one gradient-reduction bucket (stage 3: two, overlapping communication), in
    the model's dtype. A GPU holds the whole bucket; on CPU only the pages gradients pass
    through are resident (at most the dense gradients' size)."""
    if s.zero_stage == 0:
        return 0
    p = dense_param_count(s.model)
    held = bucket_elements(p) if s.device == "cuda" else min(bucket_elements(p), p)
    return (2 if s.zero_stage == 3 else 1) * held * s.elem


# --------------------------------------------------------------------------- activations, buffers

def activation_bytes(s: Setup) -> int:
    """What autograd keeps for backward, plus the backward's own transient, times T tokens,
    at the larger of the backward's two peaks.

    Counted per token from the tensors this transformer saves (checked with autograd's
    saved-tensor hooks, tests/unit/test_memory_model.py): a dense block keeps (13 + 2m) d values
    (norms, q/k/v and their rotations, attention output and projections, the FFW's m d input
    and activation); a PEER block keeps 13 d (the same attention, the FFW input) plus the
    router's query before and after BatchNorm (2 H d_key) and per selection 40 B of int64 ids
    (ids, sub-key ids, rows and bags) and 6 values (scores, gates, u.x); the model keeps 3 d
    (embeddings, final norm) and the fp32 logits (V).
    The backward starts with all of it, gradients of one block's size beside them and the
    logits' softmax and its gradient (2 V fp32). On more than one rank the query BatchNorm's
    backward (sync_bn_bytes) adds its float64 sums when backward reaches the last PEER block:
    by then the blocks after it and the loss have freed what they saved, and that block's
    mix and top-k their per-selection tensors, so that peak holds the blocks up to it less
    those, the 3 d, that block's gradients and the sums.
    """
    blocks, head = _saved_blocks(s)
    scratch = selection_scratch(s)
    start = sum(blocks) + head + 4 * s.model.vocab_size + max(blocks, default=0) \
        + 2 * 4 * s.model.vocab_size + scratch
    peak = int(s.tokens_per_rank * start)
    bn = sync_bn_bytes(s)
    if bn:
        last = max(s.model.peer_block_ids())
        ran = s.selections * (40 + 6 * s.elem)  # freed as the mix's and top-k's backward ran
        at_bn = sum(blocks[:last + 1]) - ran + head + blocks[last] + scratch
        peak = max(peak, int(s.tokens_per_rank * at_bn) + bn)
    return peak


def sync_bn_bytes(s: Setup) -> int:
    """The query BatchNorm's backward with global statistics (world > 1, bn_sync = global;
    parallel/batchnorm.py): float64 copies of dxhat and xhat and their product, 3 x (T, C) x
    8 B, C = H * d_key channels, for the sums it all-reduces, beside two (T, C) tensors in the
    activations' dtype: dxhat and the incoming gradient (a fresh tensor, made by the backward
    of the router's use of the query). Counted with live-tensor tracking in a training run and
    in tests/unit/test_memory_model.py. One layer's at a time; zero on one rank
    (nn.BatchNorm1d's native backward) or without the query BN."""
    p = s.model.peer
    if s.world_size == 1 or s.bn_sync != "global" or not p.query_batchnorm or not s.layers:
        return 0
    return s.tokens_per_rank * p.heads * p.d_key * (3 * 8 + 2 * s.elem)


# Scratch of one PEER layer while it runs, not countable from saved tensors (bytes): per
# selection, the int64 index arrays of the router's top-k, the grouping of selections by row
# (order, bag, rows, offsets) and, with dispatch or fetch, their plans and metadata both ways
# (by kind); per token ("token"), the transients of the layer's and the backward's own work.
# Fitted together with the runtime by `peer-scale calibrate` (SCRATCH_PROVENANCE); the record
# of that run, every point with its residual, is docs/scale/calibration/calibration.json.
# Fitted given each calibration point's own routing (its counted gradient rows as the routing
# law's K, routing_for), with the measured ranks' RSS following live bytes (scale.CPU_MALLOC).
# The values are negative: corrections, not buffers (about 2.3 KB per token at d = 64, 0.1 KB
# per selection): the derived terms still count some tensors as alive at the measured peak
# that are freed by then. Under glibc's own heap policy the same fit gave +6.8 KB per token:
# the heap's retention, which grew the peak step over step, not memory the step needs; with
# one backward peak for every world size (before activation_bytes priced the query BN's peak
# apart), -6.7 KB.
SELECTION_SCRATCH = {"local": -89, "fetch": -103, "dispatch": -106, "token": -2278}
SCRATCH_PROVENANCE = ("peer-scale calibrate (the 21-point calibration grid of scale.py: default "
                      "config, d = 64, N = 256, 4096 and 65536, 128 to 4096 tokens per rank, "
                      "32 to 128 selections per token, world 1 and 2, ZeRO 0-3, fp32), given "
                      "each point's routing, ranks with glibc's mmap threshold at 1 MiB, on a "
                      "2-core x86 CPU, torch 2.13, deepspeed 0.19.8, 2026-12-01; each group's "
                      "smallest point exact, the others within 2.8%)")
SCRATCH_KINDS = ("local", "fetch", "dispatch")


def scratch_kind(s: Setup) -> str:
    """Which scratch constant a point uses: one rank's own tables, or the strategy's."""
    return "local" if s.ep == 1 else s.strategy


def selection_scratch(s: Setup) -> int:
    """Bytes per token of one PEER layer's scratch: SELECTION_SCRATCH["token"] plus, per
    selection, the constant of the point's kind (see SELECTION_SCRATCH)."""
    if s.layers == 0:
        return 0
    table = s.scratch or SELECTION_SCRATCH
    # a strategy not calibrated yet (node_dispatch) holds at least dispatch's index arrays
    per_selection = table.get(scratch_kind(s), table["dispatch"])
    return table.get("token", 0) + s.selections * per_selection


def saved_activation_bytes(s: Setup) -> int:
    """The part of activation_bytes that autograd keeps (what saved-tensor hooks see)."""
    return int(s.tokens_per_rank * _saved_per_token(s)[0])


def _saved_per_token(s: Setup) -> tuple[int, int]:
    """(bytes saved per token, the largest block's share)."""
    blocks, head = _saved_blocks(s)
    return sum(blocks) + head + 4 * s.model.vocab_size, max(blocks, default=0)


def _saved_blocks(s: Setup) -> tuple[list[int], int]:
    """Bytes each block saves per token, in order, and the embeddings' and final norm's."""
    m, p, e = s.model, s.model.peer, s.elem
    dense = (13 + 2 * m.ffw_mult) * m.dim * e
    peer = 13 * m.dim * e + 2 * p.heads * p.d_key * e + s.selections * (40 + 6 * e)
    peer_ids = set(m.peer_block_ids())
    return [peer if i in peer_ids else dense for i in range(m.n_layers)], 3 * m.dim * e


def _layer_shape(s: Setup) -> cost.LayerShape:
    return cost.LayerShape(num_experts=s.n, dim=s.d, selections=s.selections,
                           tokens=s.tokens_per_rank, ep=s.ep, world=s.world_size, elem=s.elem)


def a2a_bytes(s: Setup) -> int:
    """The exchange's buffers at the step's peak: what every PEER layer keeps for backward.
    Counts as in peer_dist/parallel/cost.py (uniform routing): R distinct rows a rank selects;
    P (token, remote owner) pairs, Q remote selections, a remote share f = (E-1)/E.

    fetch (parallel/fetch.py): every layer keeps the R rows of U and V it fetched, (R, 2d) in
    the tables' dtype (all R: all_to_all_single also writes the requester's own block).
    dispatch: the owner keeps the received x (d per pair), the metadata and u.x before and
    after the activation per selection.
    Not counted: a layer's forward exchange (fetch: the owner's gathered (R_in, 2d) rows and
    the ids; dispatch: x and partial y out and in). They live only while that layer runs
    forward, before the blocks after it and the logits exist, so they are not at the peak,
    which is in backward (a count of the live tensors of a fetch run finds it in the query
    BN's backward, see sync_bn_bytes, with no exchange buffer alive).
    """
    if s.ep == 1:
        return 0
    f = (s.ep - 1) / s.ep
    t, d, e, sel = s.tokens_per_rank, s.d, s.elem, s.selections
    if s.strategy == "fetch":
        kept = selected_rows(s, 1) * 2 * d * s.table_elem
    else:
        pairs = t * _layer_shape(s).owners_touched() * f
        kept = pairs * d * e + t * sel * f * (cost.meta_bytes(e) + 2 * e)
    return int(s.layers * kept)


def replica_rows(s: Setup) -> float:
    """Expected rows of the largest shard one DP replica's gradient touches before the DP sum:
    its EP group's tokens, T * E * S draws (touched_rows counts the whole world's)."""
    rows = rows_per_rank(s.n, s.ep)
    return min(float(rows), rows * selected_rows(s, s.ep) / s.n)


def reduce_rows_bytes(s: Setup) -> int:
    """What grad_sync.reduce_rows holds for one table beside its result (the union of touched
    rows, counted by expert_grads), DP = W / E replicas; zero without DP."""
    dp = s.world_size // s.ep
    if dp == 1:
        return 0
    return reduce_rows_held(rows_per_rank(s.n, s.ep), replica_rows(s), touched_rows(s), dp,
                            s.d, s.table_elem)


def reduce_rows_held(rows: int, n1: float, union: float, dp: int, d: int, elem: int) -> int:
    """reduce_rows over dp replicas of a (rows, d) shard whose gradient has n1 rows here:
    its input (n1 values and int64 ids), and on the dense path (dp * n1 >= rows) a (rows, d + 1)
    buffer and the union's int64 ids; on the sparse path the padded values and ids, dp
    gathered copies, their concatenation and the real rows picked out, (1 + 3 dp) n1 rows.
    Bytes, beside the result."""
    row = d * elem + INDEX_BYTES
    if n1 * dp >= rows:
        return int(n1 * row + rows * (d + 1) * elem + union * INDEX_BYTES)
    return int((2 + 3 * dp) * n1 * row)


def grad_sync_bytes(s: Setup) -> int:
    """The gradient sync's phase (after backward, parallel/grad_sync.py): one table at a time
    is coalesced (fetch's served-row gradients: a copy of the touched rows; the other
    strategies' rows arrive in order and are only marked), summed over DP (reduce_rows_bytes)
    and scaled by 1/W in place, while the activations and all-to-all buffers are gone. The
    peak is the larger phase: count only what this one holds beyond theirs."""
    if not s.layers:
        return 0
    copied = touched_rows(s) if s.strategy == "fetch" and s.ep > 1 else 0.0
    sync = reduce_rows_bytes(s) + int(copied * (s.d * s.table_elem + INDEX_BYTES))
    return max(0, sync - activation_bytes(s) - a2a_bytes(s))


def a2a_bytes_moved(s: Setup) -> int:
    """Bytes one rank sends per step (forward + backward, all PEER layers, one micro-batch):
    peer_dist/parallel/cost.py's per-token formulas for uniform routing."""
    if s.ep == 1:
        return 0
    per_token = cost.predict_per_token(_layer_shape(s))[s.strategy]
    return int(per_token * s.tokens_per_rank * s.layers)


# --------------------------------------------------------------------------- the breakdown

COMPONENTS = ("expert_params", "expert_optim", "expert_grads", "dense", "activations", "a2a",
              "grad_sync", "runtime")


def breakdown(s: Setup) -> dict[str, int]:
    """Bytes per rank for each component, the expert table total (params + optimizer state,
    the exact part) and the grand total: the whole peak per rank."""
    s.validate()
    out = {
        "expert_params": expert_param_bytes(s),
        "expert_optim": table_state_bytes(s),
        "expert_grads": expert_grad_bytes(s),
        "dense": dense_bytes(s),
        "activations": activation_bytes(s),
        "a2a": a2a_bytes(s),
        "grad_sync": grad_sync_bytes(s),
        "runtime": int(s.runtime_bytes),
    }
    out["expert_tables"] = out["expert_params"] + out["expert_optim"]
    out["total"] = sum(out[k] for k in COMPONENTS)
    return out


# --------------------------------------------------------------------------- calibration

@dataclass
class Fit:
    """What `fit_calibration` found: the runtime per group, the scratch per kind (bytes per
    selection and layer), and per point the fitted peak's relative error."""

    runtime: dict[str, int]
    scratch: dict[str, int]
    residuals: list[float]


def fixed_terms(s: Setup) -> int:
    """The whole peak less the runtime and the selection scratch: what needs no constant."""
    b = breakdown(s)
    return b["total"] - b["runtime"] - int(s.tokens_per_rank * selection_scratch(s))


def fit_calibration(setups: list[Setup], measured: list[int], groups: list[str]) -> Fit:
    """Fit the constants of points i with runtime group g(i) and scratch kind k(i):

        measured_i - fixed_terms_i = runtime[g(i)] + T_i * (token + S_i * scratch[k(i)])

    (T tokens per rank, S selections per token; no scratch without a PEER layer). The runtime
    is what a minimal run holds beyond the model: each group's smallest point (least T * S) is
    its base, and the scratch constants are the least-squares fit of the other points'
    differences from their base (the runtime cancels); each runtime then makes its base exact.
    A constant no difference involves is not fitted (left out of Fit.scratch)."""
    import numpy as np

    kinds = sorted({scratch_kind(s) for s in setups if s.layers})
    cols = ["token"] + kinds
    x = np.array([[0.0] * len(cols) if not s.layers else
                  [s.tokens_per_rank] + [s.tokens_per_rank * s.selections
                                         * (scratch_kind(s) == k) for k in kinds]
                  for s in setups]).reshape(len(setups), len(cols))
    y = np.array([m - fixed_terms(s) for s, m in zip(setups, measured, strict=True)], float)
    base = {}
    for i, (s, g) in enumerate(zip(setups, groups, strict=True)):
        if g not in base or s.tokens_per_rank * (1 + s.selections) < (
                setups[base[g]].tokens_per_rank * (1 + setups[base[g]].selections)):
            base[g] = i
    diff = [i for i, g in enumerate(groups) if i != base[g]]
    sol = np.zeros(len(cols))
    if diff:
        d_x = x[diff] - x[[base[groups[i]] for i in diff]]
        d_y = y[diff] - y[[base[groups[i]] for i in diff]]
        used = np.abs(d_x).sum(0) > 0
        sol[used] = np.linalg.lstsq(d_x[:, used], d_y, rcond=None)[0]
    else:
        used = np.zeros(len(cols), bool)
    runtime = {g: int(round(y[i] - x[i] @ sol)) for g, i in base.items()}
    fitted = [runtime[g] + x[i] @ sol for i, g in enumerate(groups)]
    residuals = [float((f + fixed_terms(s)) / m - 1.0)
                 for f, s, m in zip(fitted, setups, measured, strict=True)]
    scratch = {c: int(round(v)) for c, v, u in zip(cols, sol, used, strict=True) if u}
    return Fit(runtime, scratch, residuals)
