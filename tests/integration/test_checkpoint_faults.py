"""Checkpoints you can trust, through the real CLI: a rank killed while a checkpoint is being
written leaves the previous one intact and the run resumes from it; a damaged or truncated
newest checkpoint is skipped with one warning line; an incompatible one is refused in one line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_faults import assert_one_line, error_lines, launch

from peer_dist.train import checkpoint as ckpt

ARGS = ("train.steps=4", "train.ckpt_every=2", "train.keep_last=3", "train.log_every=1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One 1-rank run with checkpoints at steps 2 and 4, copied by each test."""
    tmp = tmp_path_factory.mktemp("ckpt")
    proc = launch(tmp, *ARGS, nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return tmp


def copy_run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def resumed_step(out: str) -> int | None:
    m = re.search(r"resumed from \S+ at step (\d+)", out)
    return int(m.group(1)) if m else None


def test_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    proc = launch(tmp_path, "train.steps=6", "train.ckpt_every=2", fault="kill_in_ckpt@1:4")
    assert_one_line(proc, 1, "rank 1 was killed by SIGKILL")
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert ckpt.verify(root / "step_00000002") is None
    assert not (root / "step_00000004").exists()  # the interrupted one was never renamed
    proc = launch(tmp_path, "train.steps=6", "train.ckpt_every=2")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert resumed_step(proc.stdout) == 2
    assert sorted(p.name for p in root.iterdir()) == [
        "latest", "step_00000004", "step_00000006"]  # stale temporary removed, keep_last=2


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest_no_meta"])
def test_damaged_newest_checkpoint_falls_back_with_one_warning(trained, tmp_path, damage):
    root = copy_run(trained, tmp_path)
    newest = root / "step_00000004"
    table = sorted((newest / "tables").glob("*.distcp"))[0]
    if damage == "flip":
        data = bytearray(table.read_bytes())
        data[len(data) // 2] ^= 0x5A
        table.write_bytes(bytes(data))
    elif damage == "truncate":
        table.write_bytes(table.read_bytes()[:-100])
    else:
        (newest / ckpt.MANIFEST).unlink()
        (newest / "meta.json").unlink()
    proc = launch(tmp_path, *ARGS, nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    warnings = [line for line in error_lines(proc.stdout) if "warning" in line]
    assert len(warnings) == 1, proc.stdout[-3000:]
    assert "checkpoint step_00000004" in warnings[0] and "resuming from step_00000002" in (
        warnings[0])
    if damage != "no_manifest_no_meta":
        assert f"tables/{table.name}" in warnings[0]
    assert resumed_step(proc.stdout) == 2
    assert "Traceback" not in proc.stdout


def test_incompatible_checkpoint_is_refused_in_one_line(trained, tmp_path):
    copy_run(trained, tmp_path)
    proc = launch(tmp_path, *ARGS, "model.dim=32", "model.n_heads=2", nproc=1)
    assert_one_line(proc, 2, "was written for another model",
                    "model.dim=64 (checkpoint) vs 32 (this run)")


def test_explicit_damaged_checkpoint_is_an_error(trained, tmp_path):
    root = copy_run(trained, tmp_path)
    table = sorted((root / "step_00000004" / "tables").glob("*.distcp"))[0]
    table.write_bytes(table.read_bytes()[:-1])
    proc = launch(tmp_path, *ARGS, f"train.resume={root / 'step_00000004'}", nproc=1)
    assert_one_line(proc, 2, "train.resume=", "is damaged", f"tables/{table.name}")
