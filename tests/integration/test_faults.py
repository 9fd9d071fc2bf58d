"""Run-time faults: a non-finite step is skipped without changing any state, a diverging run
stops with the step and the source named, a hanging or killed rank is named within
train.collective_timeout_s, and every user error ends in one `peer-train:` line with no
traceback. What the launcher sees (a hang, a dead rank, agents that disagree, its own
arguments) through the real CLI (peer-train --nproc, torchrun's agent inside); what the ranks
find themselves on forked ranks (the rank side of peer-train, as torchrun runs it)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from train_cli_helpers import ROOT, TIMEOUT, TINY, env, peer_train, read_run, run_ranks

from peer_dist.train.checkpoint import all_tensors


def launch(tmp: Path, *overrides: str, nproc: int = 2, fault: str = "", data: Path | None = None,
           config: Path = TINY, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    e = env()
    e.pop("PEER_DEBUG", None)
    if fault:
        e["PEER_FAULT"] = fault
    args = [*peer_train(), "--nproc", str(nproc), "--config", str(config),
            f"train.run_dir={tmp / 'run'}", f"data.path={data or tmp.parent / 'data'}",
            *overrides]
    return subprocess.run(args, cwd=ROOT, env=e, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout)


def in_ranks(tmp: Path, *overrides: str, nproc: int = 2, fault: str = "",
             data: Path | None = None) -> subprocess.CompletedProcess:
    """launch() without the launcher: the rank side of peer-train on forked ranks, for the
    faults the ranks find and report themselves."""
    extra = {"PEER_FAULT": fault} if fault else {}
    return run_ranks(nproc, tmp / "run", list(overrides), data or tmp.parent / "data", **extra)


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("peer-train: ")
            and not INFO.match(line)]


# what a run says on start: the banner, the data line, a data folder being prepared, how the
# expert layers reach their rows
INFO = re.compile(r"peer-train: (rank \d+/|data |node \d+ of |.*: preparing it from |"
                  r"expert tables: )")


def assert_one_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = error_lines(proc.stdout)
    assert proc.returncode == code, proc.stdout[-3000:]
    assert len(lines) == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.mark.parametrize("zero", [0, 3])
def test_nonfinite_step_is_skipped_and_changes_nothing(base, zero):
    tmp = base / f"skip{zero}"
    proc = in_ranks(tmp, "train.steps=4", "train.ckpt_every=1", "train.keep_last=10",
                  "train.log_every=1", f"train.zero_stage={zero}", fault="nan_loss@1:3")
    assert proc.returncode == 0, proc.stdout[-3000:]
    warnings = [line for line in error_lines(proc.stdout) if "skipped" in line]
    assert len(warnings) == 1 and "step 3: non-finite value in the loss" in warnings[0]
    run = read_run(tmp / "run")
    skipped = {r["step"]: r["skipped"] for r in run["rows"] if r["kind"] == "train"
               and "skipped" in r}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
    assert run["summary"]["skipped_steps"] == 1
    ckpts = tmp / "run" / "checkpoints"
    before, after, later = (all_tensors(ckpts / f"step_{s:08d}") for s in (2, 3, 4))
    assert before.keys() == after.keys() and len(before) > 20
    for k in before:  # weights, table and dense optimizer state, BatchNorm statistics
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(after[k], later[k]) for k in after)  # step 4 did train


def test_nonfinite_stop_names_the_step_and_the_source(base):
    proc = in_ranks(base / "stop", "train.nonfinite=stop", fault="nan_loss@1:3")
    assert_one_line(proc, 2, "step 3", "non-finite value in the loss", "train.nonfinite=stop")


def test_diverging_run_stops_after_max_skipped(base):
    """lr 1e3 without clipping: the gradients overflow from step 2 on."""
    proc = in_ranks(base / "diverge", "optim.lr=1e3", "optim.grad_clip=0", "optim.warmup_steps=0",
                  "train.max_skipped=3", "train.steps=12", nproc=1)
    stop = [line for line in error_lines(proc.stdout) if "consecutive" in line]
    assert proc.returncode == 2 and len(stop) == 1, proc.stdout[-3000:]
    assert "step 4: 3 consecutive steps skipped" in stop[0]
    assert "the first, step 2, in dense gradient (embed.weight)" in stop[0]
    assert "Traceback" not in proc.stdout


def launch_timed(tmp: Path, *overrides: str, fault: str) -> tuple[subprocess.CompletedProcess,
                                                                   list[tuple[float, str]]]:
    """launch() with each output line's arrival time (seconds since the start)."""
    e = env()
    e.pop("PEER_DEBUG", None)
    e["PEER_FAULT"] = fault
    args = [*peer_train(), "--nproc", "2", "--config", str(TINY), f"train.run_dir={tmp / 'run'}",
            f"data.path={tmp.parent / 'data'}", *overrides]
    t0, lines = time.monotonic(), []
    with subprocess.Popen(args, cwd=ROOT, env=e, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as p:
        timer = threading.Timer(TIMEOUT, p.kill)
        timer.start()
        for line in p.stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))
        timer.cancel()
    lines.append((time.monotonic() - t0, ""))  # the launcher's exit
    out = "\n".join(line for _, line in lines)
    return subprocess.CompletedProcess(args, p.returncode, out), lines


def test_hanging_rank_is_named_within_the_timeout(base):
    """Timed from the rank's hang to the line naming it (start-up and builds excluded)."""
    proc, lines = launch_timed(base / "hang", "train.collective_timeout_s=2", fault="hang@1:3")
    line = assert_one_line(proc, 1, "step 3", "rank 1 did not take part",
                           "collective_timeout_s=2")
    hung = next(t for t, text in lines if "[fault] rank 1 hangs in step 3" in text)
    named = next(t for t, text in lines if text == line)
    # 2 s timeout + 2 s grace + the launcher's shutdown, not torch's default of 30 minutes
    assert 2 <= named - hung < 30, (hung, named)
    # then the hung rank ends itself (collective_timeout_s after the launcher's SIGTERM), not
    # after torchrun's 30 s wait for a rank that ignores it
    assert lines[-1][0] - named < 20, (named, lines[-1])


def test_resumed_run_continues_its_history(base):
    """metrics.jsonl and TensorBoard hold every step once after a resume from an older
    checkpoint (the steps after it are trained again, not appended twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp = base / "history"
    args = ("train.steps=4", "train.ckpt_every=2", "train.log_every=1")
    assert in_ranks(tmp, *args).returncode == 0
    ckpts = tmp / "run" / "checkpoints"
    # as if the job had died after step 4 and before its checkpoint
    import shutil

    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002\n")
    proc = in_ranks(tmp, *args)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout[-3000:]
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train" and "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [4]
    acc = EventAccumulator(str(tmp / "run" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- one line each

def _bad_yaml(tmp: Path) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_text("train:\n  steps: 3\n bad: [\n")
    return ["--config", str(path)]


USER_ERRORS = {
    # name: (overrides, words of the one line)
    "ep": (["parallel.ep=3"], ["parallel.ep=3", "allowed are 0 or one of [1, 2]"]),
    "source": (["data.path={tmp}/nodata", "data.source={tmp}/missing"],
               ["data.source=", "does not exist"]),
    "empty_dir": (["data.path={tmp}/emptydir"], ["holds no prepared dataset"]),
    "vocab": (["model.vocab_size=100"], ["model.vocab_size=100", ">= 256"]),
    "float": (["optim.lr=fast"], ["optim.lr='fast'", "finite number"]),
    "seq_len": (["train.seq_len=64"], ["train.seq_len=64", "max_seq_len"]),
}


@pytest.mark.parametrize("name", sorted(USER_ERRORS))
def test_user_errors_end_in_one_line(base, name):
    tmp = base / f"user_{name}"
    tmp.mkdir()
    (tmp / "emptydir").mkdir()
    (tmp / "emptydir" / "notes.txt").write_text("not tokens")
    overrides, words = USER_ERRORS[name]
    # errors found inside the ranks need no second rank (and its start-up): one; the EP check
    # names the allowed degrees of a 2-rank world
    proc = in_ranks(tmp, *[o.format(tmp=tmp) for o in overrides],
                    nproc=2 if name == "ep" else 1)
    assert_one_line(proc, 2, *words)


def test_malformed_yaml_is_one_line_naming_line_and_column(base, tmp_path):
    e = env()
    proc = subprocess.run([*peer_train(), "--nproc", "2", *_bad_yaml(tmp_path)], cwd=ROOT,
                          env=e, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=TIMEOUT)
    assert_one_line(proc, 2, "bad.yaml", "line 3, column 2")


def test_token_ids_beyond_the_vocabulary(base, tmp_path):
    """A prepared folder whose shard holds an id the model cannot embed (its meta lies)."""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    ids = np.arange(4000, dtype=np.uint16) % 256
    ids[1000:] = 300  # beyond model.vocab_size=256
    ids.tofile(data / "train.bin")
    ids[:1000].tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({
        "vocab_size": 256, "dtype": "uint16", "tokens": {"train": 4000, "val": 1000},
        "tokenizer": "byte", "eos_id": 0}))
    proc = in_ranks(tmp_path, data=data, nproc=1)
    assert_one_line(proc, 2, "token id 300", "model.vocab_size=256")


def test_run_dir_of_a_live_job_is_refused(base, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as f:  # as a live job holds it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"pid {os.getpid()} on testhost")
        f.flush()
        proc = in_ranks(tmp_path, nproc=1)
    assert_one_line(proc, 2, "is in use by a live job", "testhost")


def test_ranks_with_different_configs_are_refused(base, tmp_path):
    """Two ranks (as two nodes, each agent started by hand) with different overrides: the
    ranks compare their configs and rank 0 names the difference."""
    proc = run_ranks(2, tmp_path / "run", [], base / "data",
                     rank_overrides=([], ["optim.lr=1e-2"]))
    lines = error_lines(proc.stdout)
    assert len(lines) == 1, proc.stdout[-3000:]
    assert "was started with a different config than rank 0" in lines[0]
    assert "optim.lr=0.003 (rank 0) vs 0.01" in lines[0]
    assert proc.returncode != 0 and "Traceback" not in proc.stdout
