"""peer-train: `peer-train --config configs/tiny.yaml [key=value ...]`.

One process per rank. Under torchrun (RANK in the environment) it trains as that rank; without
torchrun it trains as a world of one, or with `--nproc N` (N > 1, or --nnodes > 1) it starts the
ranks itself through torchrun's launcher, in this process, and reports a failed rank in one line.

Every error a user can cause ends with one line `peer-train: <what, which value, what is
allowed>` on stderr (once: rank 0, or the rank that found it) and exit status 2; a rank that
dies or hangs ends the job with a line naming it (status 1). PEER_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import os
import signal

if __name__ == "__main__" and "RANK" in os.environ and "LOCAL_RANK" in os.environ:
    # A rank under torchrun: a Ctrl-C reaches the whole process group, this rank while it
    # imports torch too (a KeyboardInterrupt traceback, or a C++ abort inside an extension's
    # import). Ignored until the loop's stop handlers take it (train/preempt.py); before them
    # the launcher's agent, which got it as well, stops this rank with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

import argparse  # noqa: E402 (after the signal's disposition)
import logging  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from peer_dist import cli  # noqa: E402
from peer_dist.config import ConfigError, load_config  # noqa: E402
from peer_dist.errors import UserError, debug  # noqa: E402
from peer_dist.train.faults import parse as parse_faults  # noqa: E402

PROG = "peer-train"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(
        prog=PROG, description="Train a PEER language model (expert tables sharded "
        "across ranks, dense part with DeepSpeed ZeRO).",
        epilog="Example: peer-train --config configs/tiny.yaml train.steps=20 train.zero_stage=2")
    p.add_argument("--config", default=None, help="YAML config file (defaults if omitted)")
    p.add_argument("--nproc", type=int, default=1,
                   help="without torchrun: start this many ranks on this node")
    p.add_argument("--nnodes", type=int, default=1,
                   help="nodes of the job (each runs this command; needs --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", default="",
                   help="HOST:PORT of the rendezvous (c10d, on the first node) for --nnodes > 1")
    p.add_argument("--rdzv-id", default="peer_dist", help="job id shared by the nodes")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart every rank this many times after a failure (resumes from "
                        "the latest checkpoint)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dim=64")
    return p.parse_intermixed_args(argv)  # options and overrides in any order


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def report(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def launcher_error(args: argparse.Namespace) -> str | None:
    """The one-line error for bad launcher flags, checked whether or not ranks are started."""
    if args.nproc < 1 or args.nnodes < 1 or args.max_restarts < 0:
        return (f"--nproc={args.nproc} --nnodes={args.nnodes} --max-restarts="
                f"{args.max_restarts}: allowed are --nproc >= 1, --nnodes >= 1, "
                "--max-restarts >= 0")
    return None


LAUNCH_INTS = {"RANK": 0, "LOCAL_RANK": 0, "GROUP_RANK": 0, "WORLD_SIZE": 1,
               "LOCAL_WORLD_SIZE": 1}


def env_error(env: dict[str, str]) -> str | None:
    """The one-line error for a launcher variable no launcher would set (torchrun's, set by
    hand or left in the shell), OMP_NUM_THREADS beyond any machine, or a malformed
    PEER_FAULT; None when they are fine or unset. Each was a traceback or an internal error."""
    got = {}
    for key, low in LAUNCH_INTS.items():
        raw = env.get(key)
        if raw is None:
            continue
        if not raw.strip().isdigit() or int(raw) < low:
            return (f"{key}={raw!r} is invalid: allowed is an integer >= {low} (torchrun sets "
                    "it; unset it to run without torchrun)")
        got[key] = int(raw)
    for rank, size in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if rank in got and size in got and got[rank] >= got[size]:
            return (f"{rank}={got[rank]} with {size}={got[size]}: allowed is a rank from 0 to "
                    f"{got[size] - 1}")
    port = env.get("MASTER_PORT")
    if port is not None and "RANK" in env and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"MASTER_PORT={port!r} is invalid: allowed is a port from 1 to 65535"
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > cli.MAX_THREADS:
        return f"OMP_NUM_THREADS={threads} is invalid: allowed is 1 to {cli.MAX_THREADS}"
    try:
        parse_faults(env.get("PEER_FAULT", ""))
    except ValueError as e:
        return str(e)
    return None


def _launch_args(args: argparse.Namespace, argv: list[str]) -> list[str] | str:
    """torchrun's arguments for this command, or the one-line error for bad launcher flags."""
    if args.nnodes > 1 and not args.rdzv_endpoint:
        return f"--nnodes={args.nnodes} needs --rdzv-endpoint HOST:PORT (the first node)"
    if args.nnodes > 1 and not endpoint_ok(args.rdzv_endpoint):
        return (f"--rdzv-endpoint={args.rdzv_endpoint!r} is invalid: allowed is HOST or "
                "HOST:PORT with a port from 1 to 65535 (e.g. node0:29400)")
    rest = [a for a in ([*(["--config", args.config] if args.config else []), *args.overrides])]
    if args.nnodes > 1:
        where = [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
    else:
        where = ["--standalone"]
    return [*where, f"--nproc-per-node={args.nproc}", f"--max-restarts={args.max_restarts}",
            "-m", "peer_dist.train", *rest]


def endpoint_ok(endpoint: str) -> bool:
    """HOST, HOST:PORT or [IPv6]:PORT with a port in 1-65535 (torchrun's own check is a
    traceback, and only once every node has started)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or (":" in host and not host.startswith("[")):  # HOST alone, or a bare IPv6
        host, port = endpoint, "29400"
    return bool(host.strip("[]").strip()) and port.isdigit() and 1 <= int(port) <= 65535


def launch(torchrun_args: list[str], run_dir: str = "") -> int:
    """Run the ranks through torchrun's launcher in this process. A rank that failed with a
    reported error has printed its line already; one killed by a signal is named here. On a
    stop signal the agent forwards it to the ranks and waits for their checkpoint (a second
    signal does not cut that wait short); the status is then EXIT_INTERRUPTED if they saved."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api as mp_api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from peer_dist.train.preempt import EXIT_INTERRUPTED, read_marker

    if not debug():  # the agent logs every worker it stops; our ranks say what went wrong
        # (its modules' loggers carry levels of their own: the parent's alone is not enough)
        for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    started = time.time()
    mp_api._terminate_process_handler = _first_signal_only(mp_api)
    try:
        torchrun.run(torchrun.parse_args(torchrun_args))
    except mp_api.SignalException as e:
        if debug():
            raise
        if read_marker(run_dir, started) is not None:
            return EXIT_INTERRUPTED  # rank 0 said where the checkpoint is
        name = signal.Signals(e.sigval).name
        return report(f"stopped by {name} before the ranks saved a checkpoint (any earlier "
                      "one is intact; stopped while training, they have train.stop_grace_s to "
                      "save: raise it to give them longer)", 128 + int(e.sigval))
    except ChildFailedError as e:
        if debug():
            raise
        # A rank that exited with a status of ours has printed its line; else name the first
        # rank a signal killed (torchrun stops the others with SIGTERM after it).
        codes = [f.exitcode for f in e.failures.values() if f.exitcode > 0]
        if codes:
            return min(codes)
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name
            return report(f"rank {rank} was killed by {name}; the job stopped (checkpoints "
                          "up to the last complete one are intact)", 1)
        return failure.exitcode or 1
    except KeyboardInterrupt:  # before torchrun's handlers: no rank had started
        return report("stopped by SIGINT (Ctrl-C) before the ranks started", 130)
    if read_marker(run_dir, started) is not None:  # the ranks stopped on a signal they got
        return EXIT_INTERRUPTED
    return 0


def _first_signal_only(mp_api):
    """torchrun's agent turns a stop signal into SignalException and then waits for the
    ranks; a second signal would raise again inside that wait and orphan them mid-save.
    The handler torchrun installs (module attribute of torch 2.4-2.13) raises only once."""
    first = mp_api._terminate_process_handler
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            first(signum, frame)

    return handler


def node_line(env: dict[str, str]) -> str | None:
    """On a node's first rank of a multi-node job: which global ranks this node runs, and
    whether it holds global rank 0 (which prints the job's progress). The rendezvous numbers
    the nodes in the order they arrive, so NODE_RANK=1 may well hold rank 0."""
    nodes = int(env.get("GROUP_WORLD_SIZE", "1") or 1)
    if nodes <= 1 or env.get("LOCAL_RANK", "0") != "0":
        return None
    first, local = int(env.get("RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    ranks = f"rank {first}" if local == 1 else f"ranks {first}-{first + local - 1}"
    where = (f"node {env.get('GROUP_RANK', '?')} of {nodes} ({socket.gethostname()}) runs global "
             f"{ranks}")
    if first == 0:
        return f"{PROG}: {where}, global rank 0 among them: this node prints the job's progress"
    return f"{PROG}: {where}; global rank 0 is on another node and prints the job's progress"


def train(cfg) -> int:
    """Train as one rank; every failure ends in at most one line from this rank."""
    import torch.distributed as dist

    from peer_dist.train.loop import run
    from peer_dist.train.startup import apply_threads, check_layout, check_memory

    code, error = 0, None
    try:
        check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1") or 1))
        if "RANK" not in os.environ:  # a world of one (ranks were checked by their launcher)
            check_memory(cfg, 1, 1)
        apply_threads(cfg)
        line = node_line(dict(os.environ))
        if line:
            print(line, flush=True)
        run(cfg)
    except UserError as e:
        error = e
        if debug():
            raise
        code = report(str(e), e.exit_code) if e.should_print(_rank()) else e.exit_code
    except KeyboardInterrupt:  # before the stop handlers are in place: nothing to save yet
        code = report("stopped by SIGINT (Ctrl-C) before the first step; this run wrote no "
                      "checkpoint", 130) if _rank() == 0 else 130
    except Exception as e:  # a defect, not the user's: still one line, the traceback on request
        error = e
        if debug():
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        code = report(f"rank {_rank()}: internal error {type(e).__name__}: {first} "
                      "(PEER_DEBUG=1 shows the traceback)", 1)
    if dist.is_initialized():
        _teardown(code, code == 0 or (isinstance(error, UserError) and error.all_ranks))
    return code


def _teardown(code: int, in_step: bool) -> None:
    """Close the process group and leave. When the ranks are in step (success, or an error
    every rank raised alike) they first meet at a barrier, so no rank leaves while another
    still reports. The process then leaves with os._exit: the run's files are closed by now,
    and the communication stack's C++ destructors can abort a process at interpreter exit
    (after a failure, with peers gone or hung; and seen once after success, as "terminate
    called without an active exception")."""
    import torch.distributed as dist

    if in_step:
        try:
            dist.barrier()
            if code == 0:
                dist.destroy_process_group()
        except Exception:  # a peer left meanwhile
            code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# OpenMP threads that finished their share sleep instead of spinning (the user's setting wins).
# Read when torch loads OpenMP, so set before torch is imported; the ranks inherit it. Measured
# here, tiny on one process with 2 threads while other jobs kept the 2-core machine at load
# 10-14: 112-1,854 tokens/s spinning, 4,692-21,018 sleeping, 2,883-19,534 with 1 thread.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault(*WAIT_POLICY)
    args = parse_args(argv)
    problem = launcher_error(args) or env_error(dict(os.environ))
    if problem:
        return report(problem, 2)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if debug():
            raise
        return report(str(e), 2) if _rank() == 0 else 2
    if (args.nproc > 1 or args.nnodes > 1) and "RANK" not in os.environ:
        torchrun_args = _launch_args(args, argv)
        if isinstance(torchrun_args, str):
            return report(torchrun_args, 2)
        return start_ranks(cfg, args, torchrun_args)
    return train(cfg)


def start_ranks(cfg, args: argparse.Namespace, torchrun_args: list[str]) -> int:
    """Check the layout before any rank starts, share the cores among this node's ranks, then
    launch them."""
    from peer_dist.train import startup

    problem = startup.local_ranks_error(args.nproc)
    if problem:
        return report(problem, 2)
    try:
        startup.check_layout(cfg, args.nproc * args.nnodes)
        startup.check_memory(cfg, args.nproc * args.nnodes, args.nproc)
    except UserError as e:
        if debug():
            raise
        return report(str(e), e.exit_code)
    # Set here, the ranks inherit it (and torchrun does not force 1 thread with a warning).
    os.environ["OMP_NUM_THREADS"] = str(startup.cpu_threads(cfg, args.nproc))
    cores = startup.cpu_cores()
    if args.nproc > cores and not _has_cuda():
        print(f"{PROG}: warning: --nproc {args.nproc} CPU ranks on {cores} cores: the ranks "
              "take turns on the cores (1 thread each); allowed, but --nproc <= "
              f"{cores} gives each rank a core of its own", file=sys.stderr, flush=True)
    return launch([*stop_flags(cfg.train.stop_grace_s), *torchrun_args], cfg.train.run_dir)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def stop_flags(grace_s: float) -> list[str]:
    """torchrun forwards SIGUSR1 too (SLURM's warning before a time limit) and waits
    `grace_s` for the ranks to save before it kills them (flags of torch >= 2.9)."""
    from torch.distributed import run as torchrun

    known = torchrun.get_args_parser()._option_string_actions
    flags = {"--signals-to-handle": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
             "--shutdown-timeout": str(math.ceil(grace_s))}
    return [f"{k}={v}" for k, v in flags.items() if k in known]


if __name__ == "__main__":
    sys.exit(main())
