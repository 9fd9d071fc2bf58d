"""One config tree: dataclass defaults <- YAML file <- dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["model.peer.num_experts=65536", "train.steps=10"])

Unknown keys, wrong types and invalid values raise ConfigError before anything is built; the
message names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peer_dist.cli import MAX_THREADS
from peer_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad key or value in the config; the message says which and what is allowed. Every rank
    reads the same config, so every rank finds the same error (rank 0 reports it)."""

    def __init__(self, message: str):
        super().__init__(message, all_ranks=True)


@dataclass
class PEERConfig:
    num_experts: int = 65536  # N = n * n experts, n sub-keys per set
    heads: int = 8  # h independent retrievals sharing the same expert tables
    topk: int = 16  # k experts per head
    d_key: int = 128  # query dim per head; each sub-key has d_key / 2 dims
    activation: str = "gelu"  # gelu | relu
    query_batchnorm: bool = True  # paper default
    shared_keys: bool = False  # one sub-key pair shared by all heads (paper wording)
    # Precision of query, BatchNorm, sub-key scores, top-k and softmax: fp32 even under bf16
    # training (bf16 changes ~3% of the selected experts), or that of the activations.
    router_dtype: str = "fp32"
    # The expert tables' storage: fp32, or bf16 (half the bytes; the Triton kernels read it
    # directly and sum in fp32, the optimizer updates it in fp32 and rounds to nearest).
    table_dtype: str = "fp32"

    def validate(self, prefix: str = "model.peer") -> None:
        n = math.isqrt(self.num_experts) if self.num_experts > 0 else 0
        _check(n * n == self.num_experts and n > 0, f"{prefix}.num_experts", self.num_experts,
               "a perfect square > 0 (N = n*n), e.g. 65536 or 1048576")
        _check(self.heads >= 1, f"{prefix}.heads", self.heads, "an integer >= 1")
        _check(1 <= self.topk <= n, f"{prefix}.topk", self.topk,
               f"1 <= topk <= sqrt(num_experts) = {n}")
        _check(self.d_key >= 2 and self.d_key % 2 == 0, f"{prefix}.d_key", self.d_key,
               "an even integer >= 2")
        _check(self.activation in ACTIVATIONS, f"{prefix}.activation", self.activation,
               f"one of {list(ACTIVATIONS)}")
        _check(self.router_dtype in ROUTER_DTYPES, f"{prefix}.router_dtype", self.router_dtype,
               f"one of {list(ROUTER_DTYPES)}")
        _check(self.table_dtype in TABLE_DTYPES, f"{prefix}.table_dtype", self.table_dtype,
               f"one of {list(TABLE_DTYPES)}")


ACTIVATIONS = ("gelu", "relu")
ROUTER_DTYPES = ("fp32", "activations")
TABLE_DTYPES = ("fp32", "bf16")
SPARSE_KINDS = ("peer", "moe", "pkm")  # the layer in the blocks model.peer_blocks names
MOE_ROUTINGS = ("token", "expert")


@dataclass
class MoEConfig:
    """The mixture-of-experts baseline: experts of the dense FFW's shape (d -> ffw_mult*d -> d)."""

    experts: int = 8
    topk: int = 1  # experts per token (token choice); expert choice: tokens per expert =
    #                capacity_factor * tokens * topk / experts
    routing: str = "token"  # token (top-k per token, load-balancing loss) | expert (choice)
    aux_weight: float = 0.01  # load-balancing loss weight (token choice)
    capacity_factor: float = 1.0  # expert choice

    def validate(self) -> None:
        _check(self.experts >= 1, "model.moe.experts", self.experts, "an integer >= 1")
        _check(1 <= self.topk <= self.experts, "model.moe.topk", self.topk,
               f"1 <= topk <= model.moe.experts = {self.experts}")
        _check(self.routing in MOE_ROUTINGS, "model.moe.routing", self.routing,
               f"one of {list(MOE_ROUTINGS)}")
        _check(self.aux_weight >= 0, "model.moe.aux_weight", self.aux_weight, ">= 0")
        _check(self.capacity_factor > 0, "model.moe.capacity_factor", self.capacity_factor,
               "> 0")


@functools.lru_cache(maxsize=256)  # the memory model asks for every layout it prices
def _block_ids(peer_blocks: str, n_layers: int) -> tuple[int, ...]:
    spec = peer_blocks.strip()
    if spec == "middle":
        return (n_layers // 2,)
    if spec == "none":
        return ()
    if spec == "all":
        return tuple(range(n_layers))
    try:
        ids = sorted({int(s) for s in spec.split(",")})  # int() refuses an empty item
    except ValueError:
        ids = [-1]
    if not ids or ids[0] < 0 or ids[-1] >= n_layers:
        raise ConfigError(
            f"model.peer_blocks={peer_blocks!r}: allowed are 'middle', 'none', 'all' or "
            f"comma-separated block indices in [0, {n_layers - 1}]")
    return tuple(ids)


@dataclass
class ModelConfig:
    vocab_size: int = 256  # byte-level tokenizer; in a Config: 0 = the prepared dataset's
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4  # attention heads
    max_seq_len: int = 256
    ffw_mult: int = 4  # dense FFW hidden = ffw_mult * dim
    # Which blocks use PEER instead of the dense FFW: "middle" (the paper), "none", "all",
    # or a comma-separated list of block indices such as "1,3".
    peer_blocks: str = "middle"
    # The layer in those blocks: peer (the paper), or a baseline of the isoFLOP comparison:
    # moe (model.moe) or pkm (product-key memory: model.peer's keys, one value table)
    sparse_kind: str = "peer"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    peer: PEERConfig = field(default_factory=PEERConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def peer_block_ids(self) -> list[int]:
        return list(_block_ids(self.peer_blocks, self.n_layers))

    def has_expert_tables(self) -> bool:
        """Whether the model has PEER tables to shard (MoE and PKM layers are replicated)."""
        return self.sparse_kind == "peer" and bool(self.peer_block_ids())

    def validate(self) -> None:
        _check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size,
               "an integer >= 1, or 0 (the prepared dataset's vocabulary)")
        for key in ("dim", "n_layers", "n_heads", "max_seq_len", "ffw_mult"):
            _check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        _check(self.dim % self.n_heads == 0 and (self.dim // self.n_heads) % 2 == 0,
               "model.n_heads", self.n_heads,
               f"a divisor of model.dim={self.dim} leaving an even head dim")
        self.peer_block_ids()
        self.peer.validate()
        self.moe.validate()
        _check(self.sparse_kind in SPARSE_KINDS, "model.sparse_kind", self.sparse_kind,
               f"one of {list(SPARSE_KINDS)}")
        _check(self.rope_theta > 1, "model.rope_theta", self.rope_theta,
               "a number > 1 (the rotary base; 10000 is usual)")
        _check(0 < self.norm_eps < 1, "model.norm_eps", self.norm_eps, "a number in (0, 1)")


@dataclass
class DataConfig:
    path: str = "data/stdlib"  # a prepared shard folder (see peer-prepare)
    # Raw text prepared into `path` when it does not exist yet: "stdlib" (this Python's own
    # library source and docs, always present), or files / folders, comma-separated. Empty (the
    # default): `path` must exist, so a mistyped path is an error, not another dataset.
    source: str = ""
    tokenizer: str = "byte"  # byte | path to a Hugging Face tokenizers JSON file
    val_fraction: float = 0.01
    max_bytes: int = 50_000_000  # cap on raw text read when preparing

    def vocab_size(self) -> int:
        """The vocabulary of the prepared folder (its meta.json), else the byte tokenizer's 256
        when that prepares it; 0 when not known before preparing (peer-train sets it then)."""
        meta = Path(self.path) / "meta.json"
        try:
            return int(json.loads(meta.read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return 256 if self.tokenizer == "byte" else 0

    def validate(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
               "a fraction in (0, 1)")
        _check(self.max_bytes > 0, "data.max_bytes", self.max_bytes, "> 0")
        _check(bool(str(self.tokenizer).strip()), "data.tokenizer", self.tokenizer,
               "byte or the path of a tokenizers JSON file")


# The sets of choices live here, at the bottom of the package order (config <- ops <- model <-
# parallel <- data <- train <- tools), so the implementations, the memory model and the
# benchmarks all import the one list instead of writing it out again.
STRATEGIES = ("auto", "fetch", "dispatch", "node_dispatch")
# The strategies parallel.overlap_chunks > 1 pipelines (their classes say overlaps = True).
OVERLAPPING = ("fetch", "dispatch", "node_dispatch")
BN_SYNC = ("global", "local")
# chunks of a layer's work (parallel.overlap_chunks): 100,000 took a step from 0.02 s to minutes
MAX_OVERLAP_CHUNKS = 64


@dataclass
class ParallelConfig:
    ep: int = 0  # expert-parallel degree; 0 = the whole world (one table copy in all)
    strategy: str = "auto"  # auto (cost model) | fetch | dispatch | node_dispatch
    balance_ids: bool = False  # permute expert ids e -> (a*e + c) mod N before choosing owners
    bn_sync: str = "global"  # query BatchNorm statistics: global (all ranks) | local (per rank)
    # work cut into this many chunks whose all-to-alls run while the previous chunk computes
    # (1 = off; measured with peer-bench dist --overlap-chunks)
    overlap_chunks: int = 1

    def validate(self) -> None:
        _check(self.ep >= 0, "parallel.ep", self.ep, "0 (the whole world) or a divisor of it")
        _check(self.strategy in STRATEGIES, "parallel.strategy", self.strategy,
               f"one of {list(STRATEGIES)}")
        _check(self.bn_sync in BN_SYNC, "parallel.bn_sync", self.bn_sync, f"one of {list(BN_SYNC)}")
        _check(1 <= self.overlap_chunks <= MAX_OVERLAP_CHUNKS, "parallel.overlap_chunks",
               self.overlap_chunks, f"an integer from 1 (no overlap) to {MAX_OVERLAP_CHUNKS} "
               "(each chunk makes all-to-alls of its own: beyond a few they cost more than they "
               "hide)")
        _check(self.overlap_chunks == 1 or self.strategy in ("auto", *OVERLAPPING),
               "parallel.overlap_chunks", self.overlap_chunks,
               f"1 with parallel.strategy={self.strategy!r} (chunks > 1 with "
               f"{', '.join(('auto', *OVERLAPPING))})")


TABLE_OPTIMIZERS = ("lazy_adam", "adagrad", "dense_adam", "sgd")
TABLE_STATE_DTYPES = ("fp32", "bf16")
BIAS_CORRECTIONS = ("global", "row")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # dense part (AdamW through DeepSpeed)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    table_optimizer: str = "lazy_adam"  # lazy_adam | adagrad | dense_adam | sgd
    table_state_dtype: str = "fp32"  # fp32 | bf16: table optimizer state (bf16 halves Adam's)
    # lazy_adam's bias correction: by the global step (as torch's SparseAdam) or by each row's
    # own update count (one int32 per row more)
    table_bias_correction: str = "global"
    table_lr: float = 0.0  # 0 = use lr; the tables follow the same schedule shape
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # a checkpoint resumed with another train.steps: `continue` decays from the LR it had to
    # the new end; `recompute` follows the new length's schedule as if it had always been
    resume_schedule: str = "continue"
    grad_clip: float = 1.0  # global norm over dense and table gradients; 0 = off

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(self.table_lr >= 0, "optim.table_lr", self.table_lr, ">= 0 (0 = same as optim.lr)")
        _check(self.resume_schedule in RESUME_SCHEDULES, "optim.resume_schedule",
               self.resume_schedule, f"one of {list(RESUME_SCHEDULES)}")
        _check(self.table_optimizer in TABLE_OPTIMIZERS, "optim.table_optimizer",
               self.table_optimizer, f"one of {list(TABLE_OPTIMIZERS)}")
        _check(self.table_state_dtype in TABLE_STATE_DTYPES, "optim.table_state_dtype",
               self.table_state_dtype, f"one of {list(TABLE_STATE_DTYPES)}")
        _check(self.table_bias_correction in BIAS_CORRECTIONS, "optim.table_bias_correction",
               self.table_bias_correction, f"one of {list(BIAS_CORRECTIONS)}")
        _check(self.table_bias_correction == "global" or self.table_optimizer == "lazy_adam",
               "optim.table_bias_correction", self.table_bias_correction,
               f"'global' with optim.table_optimizer={self.table_optimizer!r} (per-row counts "
               "are lazy_adam's: dense_adam updates every row each step, adagrad and sgd have "
               "no bias correction)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio,
               "in [0, 1]")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, ">= 0 (0 = off)")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(0 < self.eps < 1, "optim.eps", self.eps, "a number in (0, 1)")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               self.betas, "two numbers in [0, 1)")


DTYPES = ("auto", "fp32", "bf16")
MAX_WAIT_S = 1_000_000  # ~11.6 days: a wait in seconds beyond it is a typo (and overflows)
RESUME_SCHEDULES = ("continue", "recompute")
NONFINITE = ("skip", "stop")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per rank per micro-batch
    seq_len: int = 128
    grad_accum: int = 1
    # sequences per optimizer step over all ranks (0 = batch_size x grad_accum x world size);
    # when set, grad_accum is derived from it, the world size and batch_size, so the run
    # trains on the same batches at any world size
    global_batch_size: int = 0
    zero_stage: int = 0
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8  # global batches (batch_size x world size x grad_accum sequences)
    ckpt_every: int = 0  # every this many steps (0 = by time only, and at the end)
    # also every this many seconds of training (0 = off): bounds what a kill can lose
    ckpt_every_s: float = 1800.0
    # on SIGTERM / SIGUSR1 / SIGINT the ranks save and stop; the launcher (peer-train --nproc,
    # torchrun --shutdown-timeout) waits this long for them before killing them
    stop_grace_s: float = 300.0
    # write the tables in the background: training pauses only to copy them in host memory
    checkpoint_async: bool = False
    keep_last: int = 2
    resume: str = "auto"  # auto (from run_dir/latest if present) | never | a checkpoint path
    run_dir: str = "runs/default"
    # A step whose loss or gradients are not finite: skip it (no parameter or optimizer state
    # changes) or stop the run; skip also stops after max_skipped consecutive skips.
    nonfinite: str = "skip"
    max_skipped: int = 10
    # A collective that waits longer than this ends the job, naming the ranks that did not come.
    collective_timeout_s: float = 600.0
    # CPU threads per rank; 0 = OMP_NUM_THREADS if set, else the cores / the ranks on the node.
    threads: int = 0

    def validate(self) -> None:
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                    "eval_batches", "keep_last", "max_skipped"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "an integer >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", self.zero_stage,
               "one of [0, 1, 2, 3]")
        _check(self.dtype in DTYPES, "train.dtype", self.dtype, f"one of {list(DTYPES)}")
        _check(self.ckpt_every >= 0, "train.ckpt_every", self.ckpt_every, ">= 0 (0 = end only)")
        _check(self.global_batch_size >= 0, "train.global_batch_size", self.global_batch_size,
               "an integer >= 0 (0 = batch_size x grad_accum x world size)")
        _check(self.ckpt_every_s >= 0, "train.ckpt_every_s", self.ckpt_every_s,
               "a number of seconds >= 0 (0 = off)")
        _check(self.nonfinite in NONFINITE, "train.nonfinite", self.nonfinite,
               f"one of {list(NONFINITE)}")
        for key in ("collective_timeout_s", "stop_grace_s"):  # both reach C ints of ms
            _check(1 <= getattr(self, key) <= MAX_WAIT_S, f"train.{key}", getattr(self, key),
                   f"a number of seconds from 1 to {MAX_WAIT_S:,}")
        _check(0 <= self.seed < 2 ** 63, "train.seed", self.seed, "an integer from 0 to 2**63 - 1")
        _check(self.run_dir.strip() != "", "train.run_dir", self.run_dir,
               "a folder path (not empty)")
        _check(0 <= self.threads <= MAX_THREADS, "train.threads", self.threads,
               f"0 (cores / local ranks, or OMP_NUM_THREADS) or an integer from 1 to "
               f"{MAX_THREADS}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=0))
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        if self.model.vocab_size == 0:
            self.model.vocab_size = self.data.vocab_size()
        self.model.validate()
        self.data.validate()
        self.parallel.validate()
        self.optim.validate()
        self.train.validate()
        _check(self.train.seq_len <= self.model.max_seq_len, "train.seq_len", self.train.seq_len,
               f"<= model.max_seq_len={self.model.max_seq_len}")
        tokens = self.train.batch_size * self.train.seq_len
        _check(self.parallel.overlap_chunks <= tokens, "parallel.overlap_chunks",
               self.parallel.overlap_chunks, f"at most the tokens of a rank's micro-batch, "
               f"train.batch_size x train.seq_len = {tokens} (a chunk holds one or more)")
        return self


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed is {allowed}")


# --------------------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `a.b.c=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder: allowed is a YAML file "
                              "such as configs/tiny.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        _merge(cfg, data, prefix="")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is invalid: allowed is key.path=value")
        _set_dotted(cfg, key.strip(), _parse_value(raw))
    return cfg.validate()


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key written twice in one mapping (PyYAML keeps the last,
    so a forgotten earlier line would silently lose to a later one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys override it
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str = "config file",
              example: str = "`train: {steps: 10}`") -> Any:
    """The file's YAML data; malformed YAML is a ConfigError naming the line and column."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}; "
                          f"allowed is a YAML mapping such as {example}") from None


def _parse_value(raw: str) -> Any:
    """An override's value as YAML (numbers, lists, booleans); text YAML cannot read stays text."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: int beyond 4300 digits
        return raw


def _merge(node: Any, data: dict, prefix: str) -> None:
    names = {f.name: f for f in dataclasses.fields(node)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}: allowed keys under "
                              f"{prefix.rstrip('.') or 'the top level'} are {sorted(names)}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping of {sorted(_field_names(current))}")
            _merge(current, value, prefix=f"{full}.")
        else:
            setattr(node, key, coerce(full, value, _field_type(node, key)))


def _set_dotted(cfg: Config, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node: Any = cfg
    walked = ""
    for part in parents:
        if part not in _field_names(node) or not dataclasses.is_dataclass(getattr(node, part)):
            raise ConfigError(f"unknown config key {key!r}: {walked + part!r} is not a section; "
                              f"allowed are {sorted(_field_names(node))}")
        node = getattr(node, part)
        walked += part + "."
    _merge(node, {leaf: value}, prefix=walked)


def _field_names(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)]


def _field_type(node: Any, key: str) -> Any:
    return typing.get_type_hints(type(node))[key]


def coerce(key: str, value: Any, tp: Any) -> Any:
    """value as type tp (bool, int, float, str or a tuple of them); else a ConfigError naming
    key, the value and what is allowed."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} is invalid: allowed is a list of {len(args)} "
                              f"numbers, e.g. [0.9, 0.95]")
        return tuple(coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        number = _number(value)
        if number is not None and float(number).is_integer() and abs(int(number)) < 2 ** 63:
            return int(number)
        raise ConfigError(f"{key}={value!r} is invalid: allowed is an integer (below 2**63 in "
                          "size), e.g. 1000, 1_000 or 1e3")
    elif tp is float:
        number = _number(value)
        if number is not None and math.isfinite(number):
            return float(number)
        raise ConfigError(f"{key}={value!r} is invalid: allowed is a finite number, e.g. "
                          "0.0003, 3e-4 or 3.0e-4")
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}={value!r} has the wrong type: allowed is {tp.__name__}")


def _number(value: Any) -> int | float | None:
    """A YAML or Python number, also from text: YAML 1.1 reads `3e-4` (no dot) as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 10)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (tuples as lists) so it can be loaded back."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False))
