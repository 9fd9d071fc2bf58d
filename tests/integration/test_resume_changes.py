"""Resuming with other settings (the rank side of peer-train, on forked ranks):
train.global_batch_size keeps the batches a step reads at any world size (1 rank accumulating
two micro-batches = 2 ranks with one each), and a finished run continued at another world size
with more steps says so, one line per change, with the LR going on down from where it was."""

from __future__ import annotations

import json
import shutil

import pytest
from train_cli_helpers import run_ranks

# Query BatchNorm off: its statistics are per micro-batch, so accumulating two micro-batches
# normalises differently from one global micro-batch (as in any BN model)
GLOBAL = ("train.global_batch_size=8", "train.batch_size=4", "train.steps=4",
          "train.log_every=1", "model.peer.query_batchnorm=false")


def test_global_batch_is_the_same_batches_at_any_world_size(runs):
    one, two = runs.get(1, *GLOBAL), runs.get(2, *GLOBAL)
    assert sorted(one["losses"]) == [1, 2, 3, 4]
    for step, loss in two["losses"].items():
        assert one["losses"][step] == pytest.approx(loss, rel=2e-5), step


def test_continued_run_says_what_changed_and_lr_never_goes_back_up(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs.get(1, *GLOBAL)["run_dir"], run_dir)
    proc = run_ranks(2, run_dir, [*GLOBAL, "train.steps=8"], runs.data)
    assert proc.returncode == 0, proc.stdout[-3000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("peer-train: resume:")]
    assert len(notes) == 2, proc.stdout[-3000:]
    assert "world size 1 -> 2: the tables were resharded from EP 1 to EP 2" in notes[0]
    assert "train.steps 4 -> 8: the LR goes on from" in notes[1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if r["kind"] == "train" and "lr" in r}
    assert sorted(lr) == list(range(1, 9))
    assert all(lr[s + 1] <= lr[s] * (1 + 1e-9) for s in range(4, 8)), lr  # no way back up
    # the 4-step schedule had reached its end (lr x min_lr_ratio): it goes on from there
    assert [lr[s] for s in range(5, 9)] == pytest.approx([3e-3 * 0.1] * 4)
