"""Stopping on a signal without losing the run: preemption, time limits, Ctrl-C.

A cluster warns a job before it kills it: Kubernetes and torchrun send SIGTERM, SLURM sends
SIGUSR1 (or SIGTERM) ahead of a time limit when asked to (`--signal`), a terminal sends SIGINT.
Each rank only records the signal (`Control`); the ranks agree to stop inside the one
all-reduce every step already makes (a signal that reached one rank stops them all, at the
same step boundary, never with some ranks waiting in a collective), save a checkpoint, and
leave with EXIT_INTERRUPTED after one line naming the signal, the step and the checkpoint.
A second signal while the checkpoint is written changes nothing: the save finishes (within
the launcher's grace period, `train.stop_grace_s`, after which torchrun kills the ranks).

The same vote carries the time-based checkpoint interval (`train.ckpt_every_s`): rank 0's
clock decides, so every rank saves at the same step.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from peer_dist.errors import UserError

# "Temporary failure, try again" (sysexits.h EX_TEMPFAIL): interrupted, checkpoint saved;
# the same command resumes. A requeueing scheduler (launch/slurm.sbatch) keys on it.
EXIT_INTERRUPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
MARKER = "interrupted.json"


class Interrupted(UserError):
    """The run stopped on a signal after saving a checkpoint (every rank raises it)."""

    exit_code = EXIT_INTERRUPTED


@dataclass
class Control:
    """Signals received by this rank and the checkpoint clock; `vote` goes into the step's
    all-reduce, `tally` reads the sums back."""

    ckpt_every_s: float = 0.0
    received: int | None = None  # the first signal's number
    count: int = 0
    last_save: float = field(default_factory=time.monotonic)
    stop: bool = False  # agreed by all ranks
    save_due: bool = False  # agreed by all ranks
    previous: dict = field(default_factory=dict)  # the handlers install() replaced

    def install(self) -> None:
        """Record SIGTERM, SIGINT and SIGUSR1 instead of dying (main thread only)."""
        self.previous = {s: signal.signal(s, self._record) for s in SIGNALS}

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous.clear()

    def _record(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal"

    def vote(self, rank: int) -> list[float]:
        """[one flag per signal in SIGNALS, save due]: this rank's signal, rank 0's clock."""
        due = rank == 0 and self.ckpt_every_s > 0 and \
            time.monotonic() - self.last_save >= self.ckpt_every_s
        return [float(self.received == s) for s in SIGNALS] + [float(due)]

    def tally(self, sums: list[float]) -> None:
        """The sums of every rank's vote: stop if any rank got a signal (named after the one
        most ranks got, so rank 0 can say which even when it got none)."""
        counts = sums[:len(SIGNALS)]
        self.stop, self.save_due = max(counts) > 0, sums[len(SIGNALS)] > 0
        if self.stop and self.received is None:
            self.received = SIGNALS[counts.index(max(counts))]

    def saved(self) -> None:
        self.last_save, self.save_due = time.monotonic(), False


def die_by(signum: int) -> None:
    """End this process as the signal's default action would (no line, no clean-up)."""
    import os
    import sys

    sys.stdout.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    signal.pause()  # the signal ends the process; not reached


def write_marker(run_dir: str | Path, step: int, signal_name: str, checkpoint: Path) -> None:
    """run_dir/interrupted.json: what the launcher reads to tell an interrupted run that saved
    its checkpoint from one that did not."""
    body = {"step": step, "signal": signal_name, "checkpoint": str(checkpoint),
            "time": time.time()}
    (Path(run_dir) / MARKER).write_text(json.dumps(body, indent=1) + "\n")


def read_marker(run_dir: str | Path, since: float) -> dict | None:
    """The marker a run wrote after `since` (a wall-clock time), or None."""
    try:
        body = json.loads((Path(run_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("time", 0) >= since else None
