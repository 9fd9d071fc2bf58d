"""Run a function on several CPU processes joined by gloo (one set of ranks per call, forked
from the session's warm server: tests/forkranks.py), and keep what one run found for every
test case that reads it."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import forkranks
import pytest
import torch.distributed as dist


def _entry(rank: int, world: int, store: str, fn: Callable, args: tuple) -> None:
    # PEER_BACKEND for the code under test; no MASTER_PORT: the ranks meet in a file, so no
    # free port is picked and lost to another process between the pick and the bind
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      PEER_BACKEND="gloo")
    # a collective that never matches (a rank skipping one) fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def run_ranks(fn: Callable, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` processes; an exception in any rank fails the call."""
    with tempfile.TemporaryDirectory(prefix="peer_ranks_") as tmp:
        store = str(Path(tmp) / "store")
        forkranks.run(_entry, world, (store, fn, args))


def run_once(cache: dict, key: str, run: Callable[[], dict]) -> dict:
    """run() the first time `key` is asked for; its result, or its failure, answers every
    later case: a layout whose ranks crash fails each of its cases at once, not after a spawn
    of its own."""
    if key not in cache:
        try:
            cache[key] = run()
        except Exception as e:  # noqa: BLE001 (any failure of the ranks is the answer)
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            cache[key] = RuntimeError(f"{key}: the ranks failed ({type(e).__name__}: {first})")
    if isinstance(cache[key], Exception):
        pytest.fail(str(cache[key]), pytrace=False)
    return cache[key]
