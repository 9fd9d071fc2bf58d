"""Stopping on a signal without losing the run: preemption, time limits, Ctrl-C.

A cluster warns a job before it kills it: Kubernetes and torchrun send SIGTERM, SLURM sends
SIGUSR1 (or SIGTERM) ahead of a time limit when asked to (`--signal`), a terminal sends SIGINT.
Each rank only records the signal (`Control`); the ranks agree to stop inside the one
all-reduce every step already makes (a signal that reached one rank stops them all, at the
same step boundary, never with some ranks waiting in a collective), save a checkpoint, and
leave with EXIT_INTERRUPTED after one line naming the signal, the step and the checkpoint.
A second signal while the checkpoint is written changes nothing: the save finishes (within
the launcher's grace period, `train.stop_grace_s`, after which torchrun kills the ranks).
A rank that does not reach a step boundary within `train.collective_timeout_s` (plus the
longest gap between two boundaries seen so far) of its first signal is hung: it ends itself
with SIGKILL, as torchrun would after its grace period, but without the wait (a job whose
rank hung then stops as soon as the hang is named).

The same vote carries the time-based checkpoint interval (`train.ckpt_every_s`): rank 0's
clock decides, so every rank saves at the same step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
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
    hung_after_s: float = 0.0  # > 0: no boundary this long after a signal ends the rank
    received: int | None = None  # the first signal's number
    count: int = 0
    last_save: float = field(default_factory=time.monotonic)
    stop: bool = False  # agreed by all ranks
    save_due: bool = False  # agreed by all ranks
    previous: dict = field(default_factory=dict)  # the handlers install() replaced
    last_vote: float | None = None
    longest_gap: float = 0.0  # between two step boundaries (votes)
    watchdog: threading.Timer | None = None

    def install(self) -> None:
        """Record SIGTERM, SIGINT and SIGUSR1 instead of dying (main thread only)."""
        self.previous = {s: signal.signal(s, self._record) for s in SIGNALS}

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous.clear()
        self._disarm()

    def _record(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum
            if self.hung_after_s > 0 and self.last_vote is not None:
                self.watchdog = threading.Timer(self.hung_after_s + self.longest_gap, _hung)
                self.watchdog.daemon = True
                self.watchdog.start()

    def _disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal"

    def vote(self, rank: int) -> list[float]:
        """[one flag per signal in SIGNALS, save due]: this rank's signal, rank 0's clock.
        Called at every step boundary: a signal recorded before it reached its boundary."""
        now = time.monotonic()
        if self.last_vote is not None:
            self.longest_gap = max(self.longest_gap, now - self.last_vote)
        self.last_vote = now
        self._disarm()
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


def _hung() -> None:
    """The watchdog: no step boundary since the signal; end now, as torchrun would later."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def die_by(signum: int) -> None:
    """End this process as the signal's default action would (no line, no clean-up)."""
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
