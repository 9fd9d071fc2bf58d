"""Fault injection for the failure tests: make one rank hang, die or write NaN at a chosen
point, through the environment, so that a test drives the real CLI under torchrun.

    PEER_FAULT=<point>@<rank>[:<step>][,...]      e.g. PEER_FAULT=hang@1:3,kill_in_ckpt@0:4

Points: `hang` (sleep inside the step, before its collectives), `kill` (SIGKILL this rank once
the step has finished), `kill_in_ckpt` (SIGKILL this rank halfway through writing a checkpoint),
`nan_loss` (the loss of this rank's first micro-batch becomes NaN). Each fires once per process,
and only in the first attempt of a job that torchrun restarts (TORCHELASTIC_RESTART_COUNT=0),
so a restarted job runs clean. Without PEER_FAULT nothing happens.
"""

from __future__ import annotations

import os
import signal
import time

POINTS = ("hang", "kill", "kill_in_ckpt", "nan_loss")
_fired: set[str] = set()


def parse(spec: str) -> list[tuple[str, int, int | None]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, where = item.partition("@")
        rank, _, step = where.partition(":")
        if point not in POINTS or not rank.isdigit() or (step and not step.isdigit()):
            raise ValueError(f"PEER_FAULT item {item!r} is invalid: allowed is "
                             f"<point>@<rank>[:<step>] with point one of {list(POINTS)}")
        out.append((point, int(rank), int(step) if step else None))
    return out


def armed(point: str, rank: int, step: int) -> bool:
    """True once when PEER_FAULT names `point` for this rank (and step, if given)."""
    spec = os.environ.get("PEER_FAULT", "")
    if not spec or point in _fired or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    for p, r, s in parse(spec):
        if p == point and r == rank and (s is None or s == step):
            _fired.add(point)
            return True
    return False


def maybe_hang(rank: int, step: int, seconds: float = 3600.0) -> None:
    if armed("hang", rank, step):
        print(f"[fault] rank {rank} hangs in step {step}", flush=True)
        time.sleep(seconds)


def maybe_kill(point: str, rank: int, step: int) -> None:
    if armed(point, rank, step):
        print(f"[fault] rank {rank} killed at {point}, step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
