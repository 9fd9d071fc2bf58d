"""Checks at start-up that every rank makes alike, so a bad config, data folder or run directory
ends the job with one line instead of a traceback from every rank (or a hang).

    agree(fn)                  fn() on every rank (or rank 0); one UserError raised everywhere
    check_same_config(cfg)     every rank was started with rank 0's config
    RunDirLock(run_dir)        one live job per run directory (released when the process ends)
    open_data(cfg, rank)       prepare (rank 0) and open the token shards, checked
"""

from __future__ import annotations

import fcntl
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

    def acquire(self) -> None:
        try:
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

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _prepare(cfg: Config) -> None:
    from peer_dist.data import META_FILE, prepare_dataset

    path = Path(cfg.data.path)
    if path.is_dir() and not (path / META_FILE).is_file() and any(path.iterdir()):
        raise UserError(f"data.path={cfg.data.path!r} holds no prepared dataset (no "
                        f"{META_FILE}); allowed: a folder written by peer-prepare, or a path "
                        "that does not exist yet (it is then prepared from data.source)")
    try:
        prepare_dataset(cfg.data)
    except (OSError, ValueError) as e:
        raise UserError(f"data.source={cfg.data.source!r} could not be prepared into "
                        f"data.path={cfg.data.path!r}: {e}") from None


def _open(cfg: Config) -> Any:
    from peer_dist.data import TokenDataset

    t = cfg.train
    try:
        data = TokenDataset(cfg.data.path)
        for split in ("train", "val"):
            data.batch(split, 0, 0, 1, t.seq_len, t.seed)  # enough tokens for one window
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"data.path={cfg.data.path!r} is not a usable dataset: {e}") from None
    if data.vocab_size > cfg.model.vocab_size:
        raise UserError(f"data.path={cfg.data.path!r} has token ids up to "
                        f"{data.vocab_size - 1} (vocabulary {data.vocab_size}) but "
                        f"model.vocab_size={cfg.model.vocab_size}; allowed: model.vocab_size >= "
                        f"{data.vocab_size}")
    return data


def open_data(cfg: Config) -> Any:
    """Prepare the dataset on rank 0 if needed, then open it on every rank; errors agreed."""
    agree(lambda: _prepare(cfg), rank0_only=True)
    return agree(lambda: _open(cfg))
