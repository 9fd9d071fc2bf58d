"""A collective that fails (timed out, or a peer's connection closed) ends the job with one
line naming the ranks that did not take part.

Every collective waits at most train.collective_timeout_s (the process group's timeout, which
the device mesh's groups inherit). When one fails, this rank marks itself in a small key-value
store beside the process group's, waits a few seconds for the other ranks' marks, and names the
ranks that never marked themselves: they are the ones stuck elsewhere, or dead. The lowest
rank that did mark prints the line; the others exit quietly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from peer_dist.errors import JobFault

_COMM_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
               "pair closure", "nccl error", "socket")


def is_comm_failure(e: BaseException) -> bool:
    """True for the errors a failed collective raises (gloo: RuntimeError with these words;
    NCCL: DistBackendError)."""
    if isinstance(e, getattr(dist, "DistBackendError", ())) or isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _COMM_WORDS)


class FaultStore:
    """A client of the job's TCP store (torchrun's, at MASTER_ADDR:MASTER_PORT), with keys of
    this attempt only (a restarted job starts a fresh set)."""

    def __init__(self, timeout_s: float):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout_s = timeout_s
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=30))
        self.store = dist.PrefixStore(f"peer_dist/faults/{run_id}/{attempt}/", base)

    def fault(self, step: int, error: BaseException, grace_s: float = 5.0,
              stopping: Callable[[], bool] = lambda: False) -> JobFault:
        """The error to end this rank with, after marking it and reading the others' marks
        (no longer once `stopping()`: the launcher is ending the ranks, one having died)."""
        try:
            self.store.set(f"failed/{self.rank}", "1")
            deadline = time.monotonic() + min(grace_s, self.timeout_s)
            marked = self._marked()
            while len(marked) < self.world and time.monotonic() < deadline and not stopping():
                time.sleep(0.2)
                marked = self._marked()
        except Exception:  # the store went with a dead rank 0: say what this rank knows
            marked = {self.rank}
        missing = [r for r in range(self.world) if r not in marked]
        first = (str(error).strip().splitlines() or [""])[0][:160]
        if missing:
            who = ", ".join(str(r) for r in missing)
            msg = (f"step {step}: rank{'s' if len(missing) > 1 else ''} {who} did not take part "
                   f"in a collective within train.collective_timeout_s={self.timeout_s:g} (hung "
                   "or dead); the job stopped")
        else:
            msg = f"step {step}: a collective failed on every rank: {first}"
        return JobFault(msg, quiet=self.rank != min(marked))

    def _marked(self) -> set[int]:
        return {r for r in range(self.world) if self.store.check([f"failed/{r}"])}
