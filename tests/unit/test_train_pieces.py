"""Trainer pieces that need no process group: LR schedule, clip factor, generated DeepSpeed
config, checkpoint pointer and pruning, CLI argument handling."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import torch

from peer_dist.config import load_config
from peer_dist.errors import UserError
from peer_dist.train import checkpoint as ckpt
from peer_dist.train.__main__ import parse_args
from peer_dist.train.deepspeed_setup import clip_factor, deepspeed_config, resolve_dtype
from peer_dist.train.loop import lr_at


def test_lr_warms_up_then_follows_cosine_to_the_floor():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    mid = 10 + 45  # halfway through the cosine part: (1 + 0.1) / 2
    assert lrs[mid] == pytest.approx(0.55, abs=1e-9)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(0, 10, 2.0, 0, 0.5) == pytest.approx(2.0)


def test_clip_factor_covers_dense_and_tables_together():
    total, factor = clip_factor(1.0, 3.0, 16.0)  # sqrt(9 + 16) = 5
    assert total == pytest.approx(5.0) and factor == pytest.approx(0.2, rel=1e-6)
    assert clip_factor(10.0, 3.0, 16.0)[1] == 1.0
    assert clip_factor(0.0, 3.0, 16.0)[1] == 1.0  # 0 = off
    assert clip_factor(1.0, math.inf, 0.0)[1] == 1.0  # DeepSpeed handles overflow itself


def test_generated_deepspeed_config_follows_ours():
    cfg = load_config(None, ["train.batch_size=3", "train.grad_accum=4", "train.zero_stage=3"])
    ds = deepspeed_config(cfg, torch.float32)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1 << 20  # sized to the dense part
    big = deepspeed_config(cfg, torch.float32, dense_params=3 * 10 ** 8)
    assert big["zero_optimization"]["allgather_bucket_size"] == 3 * 10 ** 8
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.0  # the global clip is ours
    assert ds["bf16"]["enabled"] is False
    assert deepspeed_config(cfg, torch.bfloat16)["bf16"]["enabled"] is True
    assert resolve_dtype(cfg, torch.device("cpu")) == torch.float32
    assert resolve_dtype(cfg, torch.device("cuda")) == torch.bfloat16


def test_resume_pointer_and_pruning(tmp_path):
    cfg = load_config(None, [f"train.run_dir={tmp_path}", "train.resume=auto"])
    assert ckpt.find_resume(cfg) is None
    root = ckpt.checkpoint_root(cfg)
    for step in (2, 4, 6):
        d = root / ckpt.step_name(step)
        d.mkdir(parents=True)
        (d / "meta.json").write_text("{}")
        ckpt.write_manifest(d)
    (root / ".tmp_step_00000008").mkdir()  # an interrupted write: never chosen
    ckpt._write_atomic(root / ckpt.LATEST, ckpt.step_name(6))
    assert ckpt.find_resume(cfg) == root / "step_00000006"
    ckpt.prune(root, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert not (root / ".tmp_step_00000008").exists()  # stale temporaries go too
    cfg.train.resume = "never"
    assert ckpt.find_resume(cfg) is None
    cfg.train.resume = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        ckpt.find_resume(cfg)


def _checkpoint(root, step: int, files: dict[str, bytes]):
    d = root / ckpt.step_name(step)
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    ckpt.write_manifest(d)
    return d


def test_manifest_detects_damage_truncation_and_missing_files(tmp_path):
    weights = io.BytesIO()
    torch.save({"w": torch.ones(3)}, weights)  # a .pt file must load (weights only)
    files = {"meta.json": b"{}", "tables/__0_0.distcp": bytes(range(256)) * 64,
             "dense/model.pt": weights.getvalue()}
    d = _checkpoint(tmp_path, 4, files)
    manifest = json.loads((d / ckpt.MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(files)
    assert manifest["files"]["dense/model.pt"]["size"] == len(weights.getvalue())
    assert ckpt.verify(d) is None
    (d / "extra.log").write_text("not listed: ignored")
    assert ckpt.verify(d) is None
    table = d / "tables" / "__0_0.distcp"
    data = bytearray(table.read_bytes())
    data[100] ^= 0xFF  # one flipped bit pattern, same size
    table.write_bytes(bytes(data))
    assert "is damaged: tables/__0_0.distcp has sha256" in ckpt.verify(d)
    table.write_bytes(bytes(data[:-10]))
    assert "has 16374 bytes, the manifest says 16384" in ckpt.verify(d)
    table.unlink()
    assert ckpt.verify(d) == "is incomplete: tables/__0_0.distcp is missing"
    (d / ckpt.MANIFEST).write_text("{not json")
    assert "manifest.json is not a valid manifest" in ckpt.verify(d)
    (d / ckpt.MANIFEST).unlink()
    # meta.json without a manifest: an older checkpoint, if its meta.json holds what loading
    # reads (any folder with meta.json and tables/ passed, then failed to load: a KeyError)
    assert ckpt.verify(d) == ("is damaged: meta.json lacks ['step', 'world_size', 'ep', "
                              "'zero_stage', 'table_optimizer'] (and there is no manifest.json)")
    (d / "meta.json").write_text("[1]")
    assert ckpt.verify(d) == ("is damaged: meta.json is not a JSON object (and there is no "
                              "manifest.json)")
    (d / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "ep": 1,
                                             "zero_stage": 0, "table_optimizer": "lazy_adam"}))
    assert ckpt.verify(d) is None
    (d / "meta.json").unlink()
    assert ckpt.verify(d) == "is incomplete (no manifest.json)"
    data = tmp_path / "data"  # a prepared dataset has a meta.json too (was a KeyError on load)
    data.mkdir()
    (data / "meta.json").write_text("{}")
    (data / "train.bin").write_bytes(b"")
    assert ckpt.verify(data) == "is a prepared dataset, not a checkpoint"
    (data / "train.bin").unlink()
    assert ckpt.verify(data) == "is incomplete (no manifest.json)"
    # a file and a run folder were "does not exist" and "is incomplete (no manifest.json)"
    assert ckpt.verify(data / "meta.json") == "is a file, not a checkpoint folder"
    (data / "checkpoints").mkdir()
    assert ckpt.verify(data) == (f"is a run folder, not a checkpoint: name one in "
                                 f"{str(data / 'checkpoints')!r}, or set train.run_dir="
                                 f"{str(data)!r} (train.resume=auto takes its newest)")


def test_resume_auto_falls_back_to_the_newest_valid_checkpoint(tmp_path):
    cfg = load_config(None, [f"train.run_dir={tmp_path}"])
    root = ckpt.checkpoint_root(cfg)
    for step in (2, 4, 6):
        _checkpoint(root, step, {"meta.json": b"{}", "tables/t.distcp": b"x" * 100})
    ckpt._write_atomic(root / ckpt.LATEST, ckpt.step_name(6))
    (root / "step_00000006" / "tables" / "t.distcp").write_bytes(b"y" * 100)
    (root / "step_00000004" / "tables" / "t.distcp").write_bytes(b"x" * 50)
    lines: list[str] = []
    assert ckpt.find_resume(cfg, log=lines.append) == root / "step_00000002"
    assert len(lines) == 1
    assert "checkpoint step_00000006 is damaged: tables/t.distcp" in lines[0]
    assert "checkpoint step_00000004 is damaged: tables/t.distcp has 50 bytes" in lines[0]
    assert lines[0].endswith("resuming from step_00000002")
    shutil.rmtree(root / "step_00000002")
    lines.clear()
    assert ckpt.find_resume(cfg, log=lines.append) is None
    assert "no valid checkpoint left, starting from step 0" in lines[0]
    cfg.train.resume = str(root / "step_00000006")  # named explicitly: an error, no fallback
    with pytest.raises(UserError, match="step_00000006.*is damaged"):
        ckpt.find_resume(cfg)


def test_incompatible_checkpoint_lists_the_keys_that_differ(tmp_path):
    from peer_dist.config import save_config

    saved = load_config(None, ["model.dim=64", "optim.table_optimizer=adagrad"])
    save_config(saved, tmp_path / "config.yaml")
    ckpt.check_compatible(tmp_path, load_config(None, ["model.dim=64",
                                                       "optim.table_optimizer=adagrad",
                                                       "optim.lr=5e-3", "train.steps=7"]))
    with pytest.raises(UserError) as err:
        ckpt.check_compatible(tmp_path, load_config(None, ["model.dim=128",
                                                           "model.peer.topk=8"]))
    msg = str(err.value)
    assert "model.dim=64 (checkpoint) vs 128 (this run)" in msg
    assert "model.peer.topk=16 (checkpoint) vs 8 (this run)" in msg
    assert "optim.table_optimizer='adagrad' (checkpoint) vs 'lazy_adam'" in msg
    assert "optim.lr" not in msg and "\n" not in msg
    assert "was written for another model and another table optimizer:" in msg
    with pytest.raises(UserError, match="was written for another table optimizer: optim.table_"):
        ckpt.check_compatible(tmp_path, load_config(None, ["model.dim=64"]))


def test_cli_arguments():
    args = parse_args(["--config", "configs/tiny.yaml", "--nproc", "2", "train.steps=3"])
    assert args.config == "configs/tiny.yaml" and args.nproc == 2
    assert args.overrides == ["train.steps=3"]


def test_peak_rss_is_the_process_own_not_its_parents():
    """A child started by a process holding 1 GiB reports its own, much smaller peak (Linux's
    ru_maxrss would report the parent's size: benchmark rows and torchrun workers are such
    children)."""
    import subprocess
    import sys

    from peer_dist.train.metrics import peak_rss_bytes

    held = torch.ones(2**28)  # 1 GiB, touched; the child itself peaks near 230 MB (torch)
    code = "from peer_dist.train.metrics import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    assert peak_rss_bytes() > held.numel() * 4
    assert child < held.numel() * 4 / 2


def test_a_build_lock_left_by_a_killed_build_is_removed_in_one_line(tmp_path, monkeypatch,
                                                                    capsys):
    """torch waits without end on a compiled op's lock: a build killed mid-way left every later
    run hanging silently. A lock older than any build is removed, a fresh one left alone."""
    import os
    import time

    from peer_dist.train import deepspeed_setup as ds

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert not ds.clear_stale_build_lock() and lock.exists()  # a build may be running
    old = time.time() - ds.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert ds.clear_stale_build_lock() and not lock.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"removed {lock}, left 11 min ago" in err[0], err
    assert not ds.clear_stale_build_lock()  # nothing left to remove
