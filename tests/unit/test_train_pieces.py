"""Trainer pieces that need no process group: LR schedule, clip factor, generated DeepSpeed
config, checkpoint pointer and pruning, CLI argument handling."""

from __future__ import annotations

import math

import pytest
import torch

from peer_dist.config import load_config
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
    (root / ".tmp_step_00000008").mkdir()  # an interrupted write: never chosen
    ckpt._write_atomic(root / ckpt.LATEST, ckpt.step_name(6))
    assert ckpt.find_resume(cfg) == root / "step_00000006"
    ckpt.prune(root, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    cfg.train.resume = "never"
    assert ckpt.find_resume(cfg) is None
    cfg.train.resume = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ckpt.find_resume(cfg)


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
