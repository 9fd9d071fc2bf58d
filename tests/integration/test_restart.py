"""A real failure: torchrun --max-restarts=1, rank 1 killed with SIGKILL mid-run (by itself,
after a chosen step: PEER_FAULT=kill@1:6, so the test does not depend on timing).

The agent restarts both workers; they resume from `latest`, so the steps after that checkpoint
run twice (metrics.jsonl keeps each once) and the run ends exactly where an uninterrupted run
ends (losses and final weights).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_cli_helpers import ROOT, TIMEOUT, TINY, env, read_run

from peer_dist.train.checkpoint import read_full_state

STEPS, CKPT_EVERY, KILL_AFTER = 12, 4, 6
# The same overrides for the killed run and its uninterrupted reference (the LR schedule
# depends on train.steps); log_every=1 puts every step in metrics.jsonl as it finishes.
OVERRIDES = (f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.keep_last=3",
             "train.log_every=1")
LOSS_TOL = 2e-5
# By default the agent shares one TCPStore with its workers across restarts, so the restarted
# workers can read the killed attempt's Gloo/NCCL addresses from it and fail to connect
# (pytorch/pytorch#135712). The opt-out gives every rendezvous round a fresh store.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def logged_steps(run_dir: Path) -> list[int]:
    """Train steps in metrics.jsonl in file order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train" and "loss" in r]


def test_killed_rank_restarts_and_matches_uninterrupted_run(runs, tmp_path):
    reference = runs.get(2, *OVERRIDES)  # also prepares runs.data before the killed run
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "peer_dist.train", "--config", str(TINY),
           f"train.run_dir={run_dir}", f"data.path={runs.data}", *OVERRIDES]
    log_file = tmp_path / "torchrun.log"
    # Rank 1 SIGKILLs itself once step KILL_AFTER has finished: after the step-4 checkpoint,
    # before the step-8 one, so steps 5 and 6 are lost and must run again.
    with open(log_file, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **RESTART_ENV,
                                                  "PEER_FAULT": f"kill@1:{KILL_AFTER}"},
                              stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    rc, ckpt_step, last_before_kill = proc.returncode, CKPT_EVERY, KILL_AFTER
    log = log_file.read_text()
    assert "[fault] rank 1 killed at kill, step 6" in log, log[-6000:]
    assert rc == 0, f"torchrun exit {rc} after the restart\n--- log (tail) ---\n{log[-6000:]}"

    # The restarted workers resumed from the checkpoint that existed at the kill.
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert resumed == [ckpt_step], (resumed, ckpt_step, log[-6000:])
    # Steps ckpt_step+1 .. last_before_kill ran twice; the history keeps each step once (the
    # resumed run drops the lost steps' rows before training them again).
    assert last_before_kill > ckpt_step
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))

    # Last entry per step == the uninterrupted run; identical final weights and tables.
    got = read_run(run_dir, log)
    assert sorted(got["losses"]) == sorted(reference["losses"]) == list(range(1, STEPS + 1))
    for s, loss in reference["losses"].items():
        assert got["losses"][s] == pytest.approx(loss, rel=LOSS_TOL), f"step {s}"
    final = f"checkpoints/step_{STEPS:08d}"
    want, have = read_full_state(reference["run_dir"] / final), read_full_state(run_dir / final)
    assert set(want) == set(have) and any(k.startswith("tables.") for k in want)
    for k in want:
        assert torch.equal(want[k], have[k]), k
