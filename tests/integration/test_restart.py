"""A real failure: torchrun --max-restarts=1, rank 1 killed with SIGKILL mid-run.

The agent restarts both workers; they resume from `latest`, so the steps after that checkpoint
run twice (metrics.jsonl keeps each once) and the run ends exactly where an uninterrupted run
ends (losses and final weights).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # not declared by us: DeepSpeed requires it, so it is always installed
import pytest
import torch
from train_cli_helpers import ROOT, TIMEOUT, TINY, env, read_run

from peer_dist.train.checkpoint import read_full_state

STEPS, CKPT_EVERY = 24, 4
# The same overrides for the killed run and its uninterrupted reference (the LR schedule
# depends on train.steps); log_every=1 puts every step in metrics.jsonl as it finishes.
OVERRIDES = (f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.keep_last=3",
             "train.log_every=1")
LOSS_TOL = 2e-5
# By default the agent shares one TCPStore with its workers across restarts, so the restarted
# workers can read the killed attempt's Gloo/NCCL addresses from it and fail to connect
# (pytorch/pytorch#135712). The opt-out gives every rendezvous round a fresh store.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step_"))
    except (FileNotFoundError, ValueError):
        return 0


def logged_steps(run_dir: Path) -> list[int]:
    """Train steps in metrics.jsonl in file order (a half-written last line is skipped)."""
    steps = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return steps
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["kind"] == "train" and "loss" in row:
            steps.append(row["step"])
    return steps


def worker(agent: psutil.Process, rank: int) -> psutil.Process | None:
    """The agent's worker process with RANK=rank (torchrun sets it in each worker's env)."""
    for child in agent.children():
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def kill_rank1_after_checkpoint(proc: subprocess.Popen, run_dir: Path) -> tuple[int, int]:
    """SIGKILL rank 1 once a checkpoint (step >= CKPT_EVERY) exists and at least one step past
    it is logged, but well before the next checkpoint (so the steps since it are lost and must
    be replayed). Returns (checkpoint step, last logged step) seen just before the kill."""
    agent = psutil.Process(proc.pid)
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        ckpt_step = latest_step(run_dir)
        steps = logged_steps(run_dir)
        last = steps[-1] if steps else 0
        # At most 2 steps past the checkpoint: 2 more steps and a checkpoint write separate
        # the kill from the next `latest`.
        if CKPT_EVERY <= ckpt_step < last <= ckpt_step + 2 and last < STEPS:
            target = worker(agent, 1)
            if target is not None:
                target.send_signal(signal.SIGKILL)
                return ckpt_step, last
        time.sleep(0.005)
    raise AssertionError(f"the run ended (exit {proc.poll()}) or timed out before rank 1 could "
                         f"be killed between checkpoints; last latest=step {latest_step(run_dir)}"
                         f", logged steps {logged_steps(run_dir)}: raise STEPS")


def test_killed_rank_restarts_and_matches_uninterrupted_run(runs, tmp_path):
    reference = runs.get(2, *OVERRIDES)  # also prepares runs.data before the killed run
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "peer_dist.train", "--config", str(TINY),
           f"train.run_dir={run_dir}", f"data.path={runs.data}", *OVERRIDES]
    log_file = tmp_path / "torchrun.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **RESTART_ENV}, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            ckpt_step, last_before_kill = kill_rank1_after_checkpoint(proc, run_dir)
            rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = log_file.read_text()
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
