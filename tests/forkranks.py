"""Rank processes forked from a warm server: Python, torch, DeepSpeed and peer_dist are
imported once per test session (a forkserver with those modules preloaded) instead of once
per rank, which costs ~2.5 s of CPU each time and dominated the suite.

`run(target, world, args)` runs target(rank, world, *args) on `world` such processes and
raises with the first failing rank's traceback; `train(nproc, argv, log)` runs the rank side
of `peer-train` (what torchrun's workers run: `python -m peer_dist.train ARGV`, with
torchrun's environment) on nproc of them, output in `log`. The launcher itself (torchrun's
agent, signals, a dead rank named) is tested through the real CLI elsewhere.

The server keeps the environment it started with: what a rank needs is passed and set in it.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# what a rank imports up to its end: besides the modules themselves, those they import only
# when first used (torch._dynamo by the first optimizer, 0.7 s; TensorBoard's writer; the
# checkpoint reader's file system); a name that does not import is skipped by the server
PRELOAD = ["torch", "torch.distributed.checkpoint", "deepspeed", "peer_dist.ops",
           "peer_dist.train.loop", "peer_dist.train.__main__", "peer_dist.data",
           "peer_dist.parallel", "peer_dist.train.expert_stats", "torch._dynamo",
           "torch._inductor", "torch.onnx", "torch.utils.tensorboard", "torch.utils.cpp_extension",
           "torch.distributed.checkpoint._fsspec_filesystem", "deepspeed.ops.op_builder.all_ops",
           "deepspeed.ops.triton_ops", "numpy.random", "multiprocessing.pool", "_fast_interpreter",
           "_frozen_heap"]
@functools.cache
def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child(target: Callable, rank: int, world: int, args: tuple, environ: dict,
           log: str | None, err: str) -> None:
    os.environ.clear()
    os.environ.update(environ)
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    code = 1
    try:
        code = target(rank, world, *args) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 (the parent reports it)
        Path(err).write_text(traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no C++ destructors of gloo's threads at interpreter exit


def free_port() -> int:
    """A free port below the ephemeral range. A port from bind(0) is one the system may hand
    to any other process (a client's connection) between this check and the launcher's bind,
    and a rendezvous that finds its port taken connects to the stranger and hangs; ports
    below the range are only ever taken by explicit binds."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    rng = random.Random()  # not the tests' seeded global generator
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low - 12000}, {low})")


def start(target: Callable, world: int, args: tuple, env_of: Callable[[int], dict],
          errors: str, log: str | None = None) -> list:
    """Start target(rank, world, *args) on `world` processes, rank r with environment
    env_of(r); a rank's uncaught exception goes to errors/rank<r>.err."""
    procs = []
    for rank in range(world):
        p = context().Process(target=_child, args=(target, rank, world, args, env_of(rank), log,
                                                   f"{errors}/rank{rank}.err"))
        p.start()
        procs.append(p)
    return procs


def join(procs: list, timeout_s: float) -> list[int]:
    """Exit codes; processes still running after timeout_s are killed (code -9)."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def run(target: Callable, world: int, args: tuple = (), timeout_s: float = 300) -> None:
    """target(rank, world, *args) on `world` ranks; any rank's failure fails the call with its
    traceback (or its exit code)."""
    with tempfile.TemporaryDirectory(prefix="peer_ranks_") as tmp:
        env = dict(os.environ)
        codes = join(start(target, world, args, lambda r: env, tmp), timeout_s)
        for rank in range(world):
            err = Path(tmp) / f"rank{rank}.err"
            if err.exists():
                raise RuntimeError(f"rank {rank} failed:\n{err.read_text()}")
        bad = [(r, c) for r, c in enumerate(codes) if c != 0]
        if bad:
            raise RuntimeError("ranks failed (rank, exit code; -9 = killed after "
                               f"{timeout_s:g} s): {bad}")


def _peer_train(rank: int, world: int, argv: list[str],
                module: str = "peer_dist.train.__main__") -> int:
    import importlib

    return importlib.import_module(module).main(argv)


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun's agent gives a worker of a one-node job."""
    return dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", GROUP_WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                TORCHELASTIC_RUN_ID=f"forkranks{port}", TORCHELASTIC_RESTART_COUNT="0")


def _peer_train_per_rank(rank: int, world: int, argvs: list[list[str]], module: str) -> int:
    return _peer_train(rank, world, argvs[rank], module)


def train(nproc: int, argv: list[str] | list[list[str]], log: Path, environ: dict,
          timeout_s: float, while_running: Callable[[list], None] | None = None,
          module: str = "peer_dist.train.__main__") -> int:
    """The rank side of `peer-train ARGV` on nproc ranks (one: no torchrun variables, as
    `peer-train` without --nproc); a list of argument lists gives each rank its own (as two
    nodes started with different arguments). Output appended to `log`; while_running(procs)
    is called once the ranks started (to signal one of them, say). The highest exit code, as
    torchrun reports a failed job (a killed rank: 137). `module`: another command's rank side
    (its main(argv)), as peer-sample's."""
    port = free_port()
    per_rank = bool(argv) and isinstance(argv[0], list)
    target = _peer_train_per_rank if per_rank else _peer_train
    with tempfile.TemporaryDirectory(prefix="peer_ranks_") as tmp:
        procs = start(target, nproc, (argv, module), lambda r: {
            **environ, **(torchrun_env(r, nproc, port) if nproc > 1 else {})}, tmp, str(log))
        try:
            if while_running is not None:
                while_running(procs)
        finally:
            codes = join(procs, timeout_s)
        with open(log, "a") as f:
            for err in sorted(Path(tmp).glob("*.err")):
                f.write(err.read_text())
    return max((c if c >= 0 else 128 - c) for c in codes)
