"""Run a function on several CPU processes joined by gloo (one spawn per call)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), PEER_BACKEND="gloo")
    # a collective that never matches (a rank skipping one) fails the test instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without running C++ destructors: a gloo thread still joinable at interpreter exit
    # ("terminate called without an active exception") would turn a passed check into SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` processes; an exception in any rank fails the call."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
