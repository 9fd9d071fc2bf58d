"""peer-bench checkpoint's table: means per mode, and the pause over the foreground write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from oneline import refused

from peer_dist.tools import bench_checkpoint as bench

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "million_cpu.yaml")


def rows(pauses, writes, waits):
    return [{"kind": "checkpoint", "step": i, "checkpoint_pause_s": p, "checkpoint_write_s": w,
             "checkpoint_wait_s": t} for i, (p, w, t) in enumerate(zip(pauses, writes, waits,
                                                                      strict=True))]


def test_ratio_is_background_pause_over_foreground_write(monkeypatch, capsys):
    fake = {"false": rows([10.0, 14.0], [10.0, 14.0], [0.0, 0.0]),
            "true": rows([0.2, 1.0], [15.0, 17.0], [0.0, 0.5])}
    monkeypatch.setattr(bench, "run_mode", lambda args, name, flag: fake[flag])
    bench.main(["--config", CONFIG, "--json"])
    out = json.loads(capsys.readouterr().out)  # stdout is the JSON alone (the table: stderr)
    fg, bg = out
    assert fg["pause_s"] == pytest.approx(12.0) and fg["pause_over_foreground_write"] == 1.0
    assert bg["pause_s"] == pytest.approx(0.6) and bg["wait_s"] == pytest.approx(0.25)
    assert bg["write_s"] == pytest.approx(16.0)
    assert bg["pause_over_foreground_write"] == pytest.approx(0.05)


@pytest.mark.parametrize("argv, flag, value", [
    (["--every", "0"], "--every", "0"),
    (["--steps", "4", "--every", "5"], "--every", "5"),
    (["--nproc", "0"], "--nproc", "0"),
    (["--nproc", "abc"], "--nproc", "abc"),
    (["--nproc", "1000"], "--nproc", "1000"),  # more ranks than this machine runs
    (["--steps", "0"], "--steps", "0"),
    (["--steps", str(10 ** 30)], "--steps", str(10 ** 30)),
    (["--config", "/nonexistent/bench.yaml"], "config", "/nonexistent/bench.yaml"),
    (["--config", CONFIG, "model.dim=0"], "model.dim", "0"),
    (["--config", CONFIG, "train.ckpt_every=0"], "train.ckpt_every", "0"),  # set by --every
    (["--config", CONFIG, "train.steps=3"], "train.steps", "3"),
    (["--config", CONFIG, "--run-dir", ""], "--run-dir", "''"),
    (["--config", CONFIG, "--run-dir", "/proc/x"], "--run-dir", "cannot be made or written"),
])
def test_bad_arguments_are_one_line(argv, flag, value, capsys, monkeypatch):
    """Each bad value: status 2 and one line naming it, before either training run starts."""
    def started(*a, **k):
        raise AssertionError(f"a training run started for {argv}")

    monkeypatch.setattr(bench, "run_mode", started)
    line = refused(capsys, lambda: bench.main(argv))
    assert line.startswith("peer-bench checkpoint: ") and flag in line and value in line, line
