"""peer-bench checkpoint's table: means per mode, and the pause over the foreground write."""

from __future__ import annotations

import json

import pytest

from peer_dist.tools import bench_checkpoint as bench


def rows(pauses, writes, waits):
    return [{"kind": "checkpoint", "step": i, "checkpoint_pause_s": p, "checkpoint_write_s": w,
             "checkpoint_wait_s": t} for i, (p, w, t) in enumerate(zip(pauses, writes, waits,
                                                                      strict=True))]


def test_ratio_is_background_pause_over_foreground_write(monkeypatch, capsys):
    fake = {"false": rows([10.0, 14.0], [10.0, 14.0], [0.0, 0.0]),
            "true": rows([0.2, 1.0], [15.0, 17.0], [0.0, 0.5])}
    monkeypatch.setattr(bench, "run_mode", lambda args, name, flag: fake[flag])
    bench.main(["--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fg, bg = out
    assert fg["pause_s"] == pytest.approx(12.0) and fg["pause_over_foreground_write"] == 1.0
    assert bg["pause_s"] == pytest.approx(0.6) and bg["wait_s"] == pytest.approx(0.25)
    assert bg["write_s"] == pytest.approx(16.0)
    assert bg["pause_over_foreground_write"] == pytest.approx(0.05)


@pytest.mark.parametrize("argv", [["--every", "0"], ["--steps", "4", "--every", "5"],
                                  ["--nproc", "0"]])
def test_bad_arguments_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert "allowed are" in capsys.readouterr().err
