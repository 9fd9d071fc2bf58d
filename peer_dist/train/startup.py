"""Checks at start-up that every rank makes alike, so a bad config, data folder or run directory
ends the job with one line instead of a traceback from every rank (or a hang).

    agree(fn)                  fn() on every rank (or rank 0); one UserError raised everywhere
    check_same_config(cfg)     every rank was started with rank 0's config
    RunDirLock(run_dir)        one live job per run directory (released when the process ends)
    open_data(cfg, rank)       prepare (rank 0) and open the token shards, checked
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from peer_dist.config import Config, to_dict
from peer_dist.errors import UserError

T = TypeVar("T")


def agree(fn: Callable[[], T], rank0_only: bool = False) -> T | None:
    """fn() on every rank (on rank 0 alone with rank0_only); if it raised UserError on any rank,
    every rank raises the lowest rank's error (so rank 0 alone prints it). Collective."""
    rank = dist.get_rank()
    result, error = None, None
    if not rank0_only or rank == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first, all_ranks=True)
    return result


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for every dotted key whose values differ."""
    fa, fb = _flat(a), _flat(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def check_same_config(cfg: Config) -> None:
    """Every rank must train the same config: a rank started with other overrides would
    compute different shapes and hang or corrupt the run. Collective."""
    mine = to_dict(cfg)
    configs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(configs, mine)
    for rank, other in enumerate(configs):
        diff = config_diff(configs[0], other)
        if diff:
            shown = ", ".join(f"{k}={a!r} (rank 0) vs {b!r} (rank {rank})" for k, a, b in diff[:5])
            more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
            raise UserError(f"rank {rank} was started with a different config than rank 0: "
                            f"{shown}{more}; allowed: the same config file and overrides on "
                            "every rank", all_ranks=True)


class RunDirLock:
    """An exclusive lock on <run_dir>/.lock held by rank 0 for the job's life. The kernel drops
    it when the process ends, however it ends, so a crashed job leaves no stale lock."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None
        self.made = False  # whether acquire() made the run folder

    def acquire(self) -> None:
        try:
            self.made = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"train.run_dir={str(self.path.parent)!r} cannot be written: "
                            f"{e.strerror}; allowed: a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"train.run_dir={str(self.path.parent)!r} is in use by a live job "
                            f"({holder}); allowed: another train.run_dir, or stop that job "
                            "first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        problem = run_dir_error(self.path.parent)
        if problem:
            self.release()
            raise UserError(problem)

    def release(self, tidy: bool = False) -> None:
        """Unlock; with tidy=True (a run refused before training) also remove the lock file
        and the run folder this lock made, when nothing else was written there."""
        if self.fd is None:
            return
        if tidy and self.made and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
        os.close(self.fd)
        self.fd = None


# What a run writes in train.run_dir: found in the way at the start, not at the first save
RUN_FOLDERS = ("checkpoints", "tb")
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/latest")


def run_dir_error(run_dir: Path) -> str | None:
    """Why a run cannot write its files in run_dir (a file where it keeps a folder, or the
    reverse), in one line; None when it can."""
    wrong = [f"{n!r} is a file" for n in RUN_FOLDERS
             if (run_dir / n).exists() and not (run_dir / n).is_dir()]
    wrong += [f"{n!r} is a folder" for n in RUN_FILES if (run_dir / n).is_dir()]
    if not wrong:
        return None
    return (f"train.run_dir={str(run_dir)!r} cannot hold this run: {', '.join(wrong)} (the run "
            f"keeps {', '.join(RUN_FOLDERS)} as folders and {', '.join(RUN_FILES)} as files); "
            "allowed: a run folder written by peer-train, a new one, or move them away")


def _prepare(cfg: Config) -> None:
    from peer_dist.data import META_FILE, prepare_dataset
    from peer_dist.data.prepare import prepared_mismatch

    d = cfg.data
    path = Path(d.path)
    if (path / META_FILE).is_file():
        try:
            problem = prepared_mismatch(d)
        except (OSError, ValueError, AttributeError, TypeError):  # _open names a bad meta.json
            problem = None
        if problem:
            raise UserError(problem)
        return
    if path.is_dir():
        raise UserError(f"data.path={d.path!r} holds no prepared dataset (no {META_FILE}); "
                        "allowed: a folder written by peer-prepare, or a path that does not "
                        "exist yet together with data.source (what to prepare there)")
    if not d.source.strip():
        raise UserError(f"data.path={d.path!r} does not exist; allowed: a folder written by "
                        "peer-prepare, or data.source=stdlib (or files and folders, "
                        "comma-separated) to prepare it there")
    print(f"peer-train: data.path={d.path!r} does not exist: preparing it from "
          f"data.source={d.source!r} ({d.tokenizer} tokenizer)", flush=True)
    try:
        prepare_dataset(d)
    except (OSError, ValueError) as e:
        raise UserError(f"data.source={d.source!r} could not be prepared into "
                        f"data.path={d.path!r}: {e}") from None


def _open(cfg: Config) -> Any:
    from peer_dist.data import TokenDataset

    t = cfg.train
    try:
        data = TokenDataset(cfg.data.path)
        for split in ("train", "val"):
            data.batch(split, 0, 0, 1, t.seq_len, t.seed)  # enough tokens for one window
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"data.path={cfg.data.path!r} is not a usable dataset: {e}") from None
    if cfg.model.vocab_size == 0:  # "the dataset's": known only once it was prepared
        cfg.model.vocab_size = data.vocab_size
    if data.vocab_size > cfg.model.vocab_size:
        raise UserError(f"data.path={cfg.data.path!r} has token ids up to "
                        f"{data.vocab_size - 1} (vocabulary {data.vocab_size}) but "
                        f"model.vocab_size={cfg.model.vocab_size}; allowed: model.vocab_size >= "
                        f"{data.vocab_size}, or 0 (the dataset's)")
    return data


def empty_shard_ranks(num_experts: int, ep: int) -> list[int]:
    """EP ranks that own no table row: rows are cut in blocks of ceil(N / ep)."""
    block = -(-num_experts // ep)
    return [r for r in range(ep) if r * block >= num_experts]


def check_layout(cfg: Config, world_size: int) -> None:
    """Refuse a layout that leaves a rank with nothing to hold (an EP rank without a table row)
    or a query BatchNorm of one token. Every rank finds the same answer (one line, from
    rank 0)."""
    from peer_dist.parallel.topology import TopologyError, check_degrees

    try:
        ep, _ = check_degrees(world_size, cfg.parallel.ep)
    except TopologyError as e:
        raise UserError(str(e), all_ranks=True) from None
    m, tokens = cfg.model, cfg.train.batch_size * cfg.train.seq_len
    global_bn = world_size > 1 and cfg.parallel.bn_sync == "global"
    if (m.sparse_kind in ("peer", "pkm") and m.peer_block_ids() and m.peer.query_batchnorm
            and tokens == 1 and not global_bn):  # BatchNorm of one value per channel
        raise UserError("model.peer.query_batchnorm: a training batch of 1 token per rank "
                        "(train.batch_size=1 x train.seq_len=1) cannot be normalised; allowed "
                        "are more tokens per rank, model.peer.query_batchnorm=false"
                        + (", or parallel.bn_sync=global (statistics over every rank's tokens)"
                           if world_size > 1 else ""), all_ranks=True)
    n = cfg.model.peer.num_experts
    if not cfg.model.has_expert_tables():
        return  # only PEER tables are sharded
    empty = empty_shard_ranks(n, ep)
    if empty:
        fits = [d for d in range(1, world_size + 1)
                if world_size % d == 0 and not empty_shard_ranks(n, d)]
        raise UserError(f"model.peer.num_experts={n} over parallel.ep={ep} ranks leaves EP "
                        f"rank{'s' if len(empty) > 1 else ''} {_span(empty)} without a table row; "
                        f"allowed: parallel.ep in {fits} at world size {world_size}, or more "
                        "experts", all_ranks=True)


STATE_PER_ROW = {"lazy_adam": None, "dense_adam": None, "adagrad": 1, "sgd": 0}  # None: 2 * d
ELEM = {"fp32": 4, "bf16": 2}


def least_bytes_per_rank(cfg: Config, world_size: int) -> dict[str, int]:
    """What one rank must hold at the least, from the config alone: its expert-table rows and
    their optimizer state (exact), the dense parameters (2 bytes each, at ZeRO 3 over the
    world) and one micro-batch's fp32 logits. The whole peak is larger (peer-scale predicts
    it); this bound only catches a config that cannot fit at all, before anything allocates."""
    m, p, t = cfg.model, cfg.model.peer, cfg.train
    d, vocab = m.dim, max(m.vocab_size, 1)
    blocks = len(m.peer_block_ids())
    tables = state = sparse_dense = 0
    if m.sparse_kind in ("peer", "pkm") and blocks:  # the router: queries and sub-keys
        sparse_dense = blocks * p.heads * p.d_key * (d + math.isqrt(p.num_experts))
    if m.sparse_kind == "peer" and blocks:
        ep = world_size if cfg.parallel.ep == 0 else cfg.parallel.ep
        rows = -(-p.num_experts // max(ep, 1))
        per_row = STATE_PER_ROW[cfg.optim.table_optimizer]
        per_row = 2 * d if per_row is None else per_row
        tables = blocks * 2 * rows * d * ELEM[p.table_dtype]
        state = blocks * 2 * rows * per_row * ELEM[cfg.optim.table_state_dtype]
    elif m.sparse_kind == "pkm":
        sparse_dense += blocks * p.num_experts * d
    elif m.sparse_kind == "moe":
        sparse_dense = blocks * m.moe.experts * 2 * d * m.ffw_mult * d
    params = (2 * vocab * d + sparse_dense + m.n_layers * 4 * d * d
              + (m.n_layers - blocks) * 2 * d * m.ffw_mult * d)
    dense = 2 * params // (world_size if t.zero_stage == 3 else 1)
    dense += 4 * m.max_seq_len * (d // m.n_heads)  # the rotary cos and sin tables (fp32)
    return {"expert tables": tables, "their optimizer state": state, "dense parameters": dense,
            "logits": 4 * t.batch_size * t.seq_len * vocab}


def memory_per_rank(local_ranks: int) -> tuple[int, str] | None:
    """Bytes each of this machine's local ranks can have, and of what: a GPU's memory (NCCL),
    else the host's available memory shared by the ranks; None when it cannot be read."""
    import torch

    from peer_dist.parallel.topology import pick_backend

    if pick_backend() == "nccl":
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return available // max(local_ranks, 1), f"available memory over {local_ranks} rank(s)"


SHRINK = {  # what makes each part smaller
    "expert tables": "a smaller model.peer.num_experts or model.dim, or more ranks (parallel.ep)",
    "their optimizer state": "a smaller model.peer.num_experts or model.dim, "
                             "optim.table_optimizer=adagrad, or more ranks (parallel.ep)",
    "dense parameters": "a smaller model.dim, model.n_layers, model.vocab_size, "
                        "model.max_seq_len or model.peer.heads x d_key",
    "logits": "a smaller train.batch_size, train.seq_len or model.vocab_size",
}


def check_memory(cfg: Config, world_size: int, local_ranks: int) -> None:
    """Refuse a config whose least bytes per rank exceed what a rank here can have: one line
    naming the parts and the keys to change, instead of an allocation failure or the kernel's
    out-of-memory killer part way into the start."""
    have = memory_per_rank(local_ranks)
    if have is None:
        return
    parts = least_bytes_per_rank(cfg, world_size)
    need = sum(parts.values())
    if need <= have[0]:
        return
    gib = 1024 ** 3
    shown = ", ".join(f"{k} {v / gib:,.1f}" for k, v in parts.items()
                      if v >= need / 100)
    largest = max(parts, key=parts.__getitem__)
    raise UserError(f"this config needs at least {need / gib:,.1f} GiB per rank ({shown} GiB) "
                    f"and a rank here has {have[0] / gib:,.1f} GiB ({have[1]}); allowed: "
                    f"{SHRINK[largest]}", all_ranks=True)


def _span(ranks: list[int]) -> str:
    return f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask: a container or taskset may give fewer
    than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


RANKS_PER_CORE = 8  # CPU ranks beyond this many per core only take turns (and memory)


def local_ranks_error(nproc: int, flag: str = "--nproc") -> str | None:
    """The one-line error for more ranks on this machine than it can run: NCCL runs one rank
    per GPU; CPU ranks (gloo) at most RANKS_PER_CORE per core. None when they fit."""
    import torch

    from peer_dist.parallel.topology import pick_backend

    if pick_backend() == "nccl":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            return (f"{flag}={nproc}: this machine has {gpus} GPU(s) and NCCL runs one rank "
                    f"per GPU: allowed is 1 to {gpus} (or PEER_BACKEND=gloo for CPU ranks)")
        return None
    cores = cpu_cores()
    if nproc > RANKS_PER_CORE * cores:
        return (f"{flag}={nproc}: CPU ranks on this machine's {cores} core(s): allowed is 1 to "
                f"{RANKS_PER_CORE * cores} ({RANKS_PER_CORE} per core at most)")
    return None


def cpu_threads(cfg: Config, local_ranks: int, env: dict[str, str] | None = None) -> int:
    """Threads per rank: train.threads, else OMP_NUM_THREADS, else the cores shared evenly by
    the node's ranks (more would oversubscribe them: threads that spin waiting for a core)."""
    env = os.environ if env is None else env
    if cfg.train.threads:
        return cfg.train.threads
    raw = env.get("OMP_NUM_THREADS", "")
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return max(1, cpu_cores() // max(1, local_ranks))


def apply_threads(cfg: Config) -> int:
    """Set this rank's intra-op threads (before any work); returns how many."""
    import torch

    n = cpu_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    torch.set_num_threads(n)
    return n


def data_line(cfg: Config, data: Any, threads: int) -> str:
    """The start line about the data: what is read, how much, which vocabulary, and the CPU
    threads each rank uses."""
    meta = data.meta
    tok = meta.get("tokenizer_source", meta.get("tokenizer", "?"))
    return (f"peer-train: data {cfg.data.path}: {data.num_tokens('train'):,} train + "
            f"{data.num_tokens('val'):,} val tokens, vocabulary {data.vocab_size} "
            f"({tok} tokenizer), model.vocab_size={cfg.model.vocab_size}; "
            f"{threads} CPU thread{'s' if threads != 1 else ''} per rank")


def open_data(cfg: Config) -> Any:
    """Prepare the dataset on rank 0 if needed, then open it on every rank; errors agreed."""
    import torch

    agree(lambda: _prepare(cfg), rank0_only=True)
    data = agree(lambda: _open(cfg))
    if dist.get_rank() == 0:
        print(data_line(cfg, data, torch.get_num_threads()), flush=True)
    return data
