"""The rank runner the other tests stand on fails when a rank fails: with the rank's
traceback, its exit code, or after its time limit."""

from __future__ import annotations

import os
import time

import forkranks
import pytest


def _ranks(rank: int, world: int, how: str) -> int:
    if rank == 1 and how == "raise":
        raise ValueError("planted in rank 1")
    if rank == 1 and how == "exit":
        return 3
    if rank == 1 and how == "hang":
        time.sleep(60)
    assert os.environ["PEER_FORKRANKS_PROBE"] == "set by the parent"
    return 0


@pytest.mark.parametrize("how,match", [
    ("raise", "(?s)rank 1 failed:.*ValueError: planted in rank 1"),
    ("exit", r"\[\(1, 3\)\]"),
    ("hang", r"killed after 2 s\): \[\(1, -9\)\]")])
def test_a_failing_rank_fails_the_call(monkeypatch, how, match):
    monkeypatch.setenv("PEER_FORKRANKS_PROBE", "set by the parent")  # after the server started
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=match) as e:
        forkranks.run(_ranks, 2, (how,), timeout_s=2)
    assert "rank 0" not in str(e.value)
    assert time.monotonic() - t0 < 30


def test_healthy_ranks_pass(monkeypatch):
    monkeypatch.setenv("PEER_FORKRANKS_PROBE", "set by the parent")
    forkranks.run(_ranks, 3, ("none",))
