"""Checkpoints you can trust: a rank killed while a checkpoint is being written (through the
real CLI, whose launcher names it) leaves the previous one intact and the run resumes from it;
a damaged or truncated newest checkpoint is skipped with one warning line; an incompatible one
is refused in one line (these on forked ranks: the rank side of peer-train)."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_faults import assert_one_line, error_lines, in_ranks, launch
from torch.distributed.checkpoint.api import CheckpointException

from peer_dist.train import checkpoint as ckpt
from peer_dist.train import safe_load

ARGS = ("train.steps=4", "train.ckpt_every=2", "train.keep_last=3", "train.log_every=1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One 1-rank run with checkpoints at steps 2 and 4, copied by each test."""
    tmp = tmp_path_factory.mktemp("ckpt")
    proc = in_ranks(tmp, *ARGS, nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return tmp


def copy_run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def resumed_step(out: str) -> int | None:
    m = re.search(r"resumed from \S+ at step (\d+)", out)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("background", ["false", "true"])
def test_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path, background):
    """Rank 1 SIGKILLed inside the step-4 write: step 2 stays the newest checkpoint, and the
    same command resumes from it. Foreground writes through the real CLI, whose launcher
    names the dead rank in one line; background writes on forked ranks, where rank 0 names
    it (no launcher to stop it, so a short collective timeout)."""
    args = ("train.steps=6", "train.ckpt_every=2", f"train.checkpoint_async={background}")
    if background == "false":
        proc = launch(tmp_path, *args, fault="kill_in_ckpt@1:4")
        assert_one_line(proc, 1, "rank 1 was killed by SIGKILL")
    else:
        proc = in_ranks(tmp_path, *args, "train.collective_timeout_s=2", fault="kill_in_ckpt@1:4")
        assert "[fault] rank 1 killed at kill_in_ckpt, step 4" in proc.stdout, proc.stdout
        assert_one_line(proc, 128 + 9, "rank 1 did not take part")
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert ckpt.verify(root / "step_00000002") is None
    assert not (root / "step_00000004").exists()  # the interrupted one was never renamed
    proc = in_ranks(tmp_path, "train.steps=6", "train.ckpt_every=2")
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
    proc = in_ranks(tmp_path, *ARGS, nproc=1)
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
    proc = in_ranks(tmp_path, *ARGS, "model.dim=32", "model.n_heads=2", nproc=1)
    assert_one_line(proc, 2, "was written for another model",
                    "model.dim=64 (checkpoint) vs 32 (this run)")


def test_explicit_damaged_checkpoint_is_an_error(trained, tmp_path):
    root = copy_run(trained, tmp_path)
    table = sorted((root / "step_00000004" / "tables").glob("*.distcp"))[0]
    table.write_bytes(table.read_bytes()[:-1])
    proc = in_ranks(tmp_path, *ARGS, f"train.resume={root / 'step_00000004'}", nproc=1)
    assert_one_line(proc, 2, "train.resume=", "is damaged", f"tables/{table.name}")


# --------------------------------------------------------------------------- never runs code

class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def poison(ckpt_dir: Path, name: str, marker: Path) -> None:
    """Replace `name` with a pickle payload and rewrite the manifest to match it, as whoever
    can write the checkpoint's files can."""
    target = ckpt_dir / name
    if name.endswith(".metadata"):
        target.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"state": Payload(marker)}, target)
    ckpt.write_manifest(ckpt_dir)


def test_every_pickle_is_refused_without_running(trained, tmp_path):
    """Each file in turn: verification refuses it in one line naming the file, and the
    payload never runs (the readers refuse the global before it is looked up)."""
    root = copy_run(trained, tmp_path)
    src = root / "step_00000004"
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*")
                   if p.is_file() and p.name.endswith((".pt", ".metadata", ".distcp")))
    assert {"rng/rank_0.pt", "dense_full.pt", "dense/mp_rank_00_model_states.pt",
            "tables/.metadata"} <= set(names)
    marker = tmp_path / "ran"
    for name in names:
        case = tmp_path / name.replace("/", "_")
        shutil.copytree(src, case)
        poison(case, name, marker)
        if name.endswith(".distcp"):  # tensor data: DCP reads it with weights_only=True
            with pytest.raises(CheckpointException, match="read_data"):  # damaged, never run
                ckpt.read_full_state(case)
        else:
            problem = ckpt.verify(case)
            assert problem is not None and name in problem and "never run" in problem, name
        assert not marker.exists(), f"{name}: the payload ran"
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        safe_load.read_metadata(tmp_path / "tables_.metadata" / "tables" / ".metadata")


def test_deepspeed_files_load_through_the_safe_reader(tmp_path):
    """DeepSpeed's engine reads its files through checkpoint_engine.load (the hook we
    replace): a payload there is refused, a tensor file loads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    marker, f = tmp_path / "ran", tmp_path / "x.pt"
    torch.save({"state": Payload(marker)}, f)
    with safe_load.engine_loads(Engine):
        with pytest.raises(pickle.UnpicklingError):
            Engine.checkpoint_engine.load(str(f))
        torch.save({"w": torch.ones(2)}, f)
        assert torch.equal(Engine.checkpoint_engine.load(str(f))["w"], torch.ones(2))
    assert not marker.exists()
    assert "load" not in vars(Engine.checkpoint_engine)  # restored afterwards


def test_poisoned_checkpoint_through_the_cli(trained, tmp_path):
    """An explicit resume of a poisoned checkpoint: one line, exit 2, nothing ran; with
    resume=auto the run falls back to the previous checkpoint with one warning."""
    root = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    poison(root / "step_00000004", "rng/rank_0.pt", marker)
    proc = in_ranks(tmp_path, *ARGS, f"train.resume={root / 'step_00000004'}", nproc=1)
    assert_one_line(proc, 2, "train.resume=", "rng/rank_0.pt", "never run as code")
    assert not marker.exists()


def test_damaged_tables_with_a_matching_manifest_end_in_one_line(trained, tmp_path):
    """Damage that happened before the manifest was written (so the checksums match): the
    tables cannot be loaded, and the run says so in one line."""
    root = copy_run(trained, tmp_path)
    table = sorted((root / "step_00000004" / "tables").glob("*.distcp"))[0]
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    ckpt.write_manifest(root / "step_00000004")
    proc = in_ranks(tmp_path, *ARGS, f"train.resume={root / 'step_00000004'}", nproc=1)
    assert_one_line(proc, 2, "step_00000004", "its tables state cannot be loaded")
