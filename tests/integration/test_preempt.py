"""Preemption: a stop signal mid-run (SIGTERM, SIGUSR1 or SIGINT, to the launcher of the real
CLI, to its whole process group as Ctrl-C does, or to one forked rank only) makes every rank
stop at the same step, save a checkpoint, say so in one line and exit with EXIT_INTERRUPTED;
the same command then resumes, and the final parameters and optimizer state equal an
uninterrupted run's bit for bit. Each signal path once: Ctrl-C here, SIGUSR1 to the launcher in
the resume test, SIGTERM to one forked rank, and SIGTERM to the whole job in peer-chaos's
preemption (tests/integration/test_chaos.py), which resumes too; the launcher forwards SIGTERM
as it does SIGUSR1 (torchrun's --signals-to-handle)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_faults import all_tensors, error_lines
from train_cli_helpers import ROOT, TIMEOUT, TINY, env, peer_train, run_ranks

from peer_dist.train import checkpoint as ckpt
from peer_dist.train.preempt import EXIT_INTERRUPTED

STEPS = 40  # the signal lands at step 3: the rest is the run to compare
ARGS = (f"train.steps={STEPS}", "train.log_every=1", "train.keep_last=2")


def start(tmp: Path, data: Path, *extra: str) -> subprocess.Popen:
    args = [*peer_train(), "--nproc", "2", "--config", str(TINY), f"train.run_dir={tmp / 'run'}",
            f"data.path={data}", *ARGS, *extra]
    return subprocess.Popen(args, cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def signal_mid_run(proc: subprocess.Popen, send) -> str:
    """Wait for step 3 in the progress output, `send` the signal, return the whole output."""
    out, deadline = [], time.monotonic() + TIMEOUT
    for line in proc.stdout:
        out.append(line)
        if re.match(r"step\s+3/", line):
            send(proc)
            break
        assert time.monotonic() < deadline, "".join(out)[-3000:]
    rest, _ = proc.communicate(timeout=TIMEOUT)
    return "".join(out) + rest


SENDERS = {
    "SIGUSR1 to the launcher": lambda p: os.kill(p.pid, signal.SIGUSR1),
    "Ctrl-C (SIGINT to the group)": lambda p: os.killpg(p.pid, signal.SIGINT),
}


def assert_stopped(out: str, code: int, run_dir: Path, name: str) -> int:
    """One line naming the signal and the checkpoint; that checkpoint is valid."""
    lines = error_lines(out)
    assert code == EXIT_INTERRUPTED, out[-3000:]
    assert len(lines) == 1 and f"stopped by {name}" in lines[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    step = int(re.search(r"at step (\d+) of", lines[0]).group(1))
    assert 3 <= step < STEPS
    path = run_dir / "checkpoints" / ckpt.step_name(step)
    assert str(path) in lines[0] and ckpt.verify(path) is None
    return step


@pytest.fixture(scope="module")
def data(runs) -> Path:
    runs.get(1, "train.steps=1")  # prepares runs.data once
    return runs.data


def test_ctrl_c_saves_and_exits(tmp_path, data):
    proc = start(tmp_path, data)
    out = signal_mid_run(proc, SENDERS["Ctrl-C (SIGINT to the group)"])
    assert_stopped(out, proc.returncode, tmp_path / "run", "SIGINT")


def test_sigterm_to_one_rank_stops_every_rank(tmp_path, data):
    """A signal only rank 1 got (forked ranks, no launcher): the vote stops both at the same
    step, rank 0 names the signal it did not get."""

    def sigterm_rank1_at_step_3(procs, log: Path) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not re.search(r"^step\s+3/", log.read_text() if log.exists() else "", re.M):
            assert time.monotonic() < deadline and all(p.is_alive() for p in procs)
            time.sleep(0.02)
        os.kill(procs[1].pid, signal.SIGTERM)

    proc = run_ranks(2, tmp_path / "run", list(ARGS), data,
                     while_running=sigterm_rank1_at_step_3)
    assert_stopped(proc.stdout, proc.returncode, tmp_path / "run", "SIGTERM")


def test_preempted_run_resumes_to_the_uninterrupted_state(tmp_path, data, runs):
    """With background checkpoints every 2 steps: the stop waits for the one in flight and
    writes its own; what is resumed is exactly the state of that step."""
    background = ("train.checkpoint_async=true", "train.ckpt_every=2")
    proc = start(tmp_path, data, *background)
    t0 = time.monotonic()
    out = signal_mid_run(proc, SENDERS["SIGUSR1 to the launcher"])  # SLURM's warning
    stopped_in = time.monotonic() - t0
    step = assert_stopped(out, proc.returncode, tmp_path / "run", "SIGUSR1")
    assert stopped_in < 60, out[-3000:]  # well inside the grace period (train.stop_grace_s)
    # the same command again (its rank side: the launcher has nothing to do in a resume)
    again = run_ranks(2, tmp_path / "run", [*ARGS, *background], data)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"at step {step}" in again.stdout
    reference = runs.get(2, *ARGS)
    final = f"checkpoints/{ckpt.step_name(STEPS)}"
    want = all_tensors(reference["run_dir"] / final)
    have = all_tensors(tmp_path / "run" / final)
    assert set(want) == set(have) and any(".opt." in k for k in want)
    for k in want:
        assert torch.equal(want[k], have[k]), k
