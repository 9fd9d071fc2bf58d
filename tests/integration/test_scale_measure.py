"""peer-scale measure on a tiny grid: torchrun runs of the real trainer (2 gloo ranks, CPU),
each measurement beside its prediction; the table, CSV, plot and TensorBoard files are written."""

from __future__ import annotations

import json
from pathlib import Path

from peer_dist.tools.scale import main

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

KEYS = ("num_experts", "dim", "ep", "world_size", "zero_stage", "tokens_per_rank",
        "expert_bytes_per_rank_predicted", "expert_bytes_per_rank_measured",
        "peak_bytes_per_rank_predicted", "peak_bytes_per_rank_measured", "runtime", "step_s")


def test_measure_tiny_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # measure the runtime here
    main(["measure", "--config", str(TINY), "--num-experts", "4096", "--dim", "32",
          "--ep", "1,2", "--world-size", "2", "--tokens-per-rank", "128", "--steps", "3",
          "--data-bytes", "300000", "--out", str(tmp_path), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [(r["ep"], r["world_size"]) for r in rows] == [(1, 2), (2, 2)]
    for r in rows:
        assert all(r.get(k) is not None for k in KEYS), r
        # tables + lazy_adam moments: 3 * rows * d * 2 tables * 4 B, rows = 4096 / EP
        assert r["expert_bytes_per_rank_predicted"] == 3 * (4096 // r["ep"]) * 32 * 2 * 4
        err = abs(r["expert_bytes_per_rank_measured"] / r["expert_bytes_per_rank_predicted"] - 1)
        assert err < 0.10, r
        assert r["peak_bytes_per_rank_measured"] > r["expert_bytes_per_rank_measured"]
        # the whole peak: the model's terms plus the runtime measured once on this machine
        assert r["runtime"] > 0 and abs(r["peak_rel_err"]) < 0.10, r
        assert r["peak_bytes_per_rank_predicted"] == sum(r[k] for k in (
            "expert_params", "expert_optim", "expert_grads", "dense", "activations", "a2a",
            "runtime"))
        assert r["step_s"] > 0
    cache = json.loads((tmp_path / "cache" / "peer_dist" / "runtime_bytes.json").read_text())
    assert len(cache) == 1 and list(cache.values())[0] == rows[0]["runtime"]  # measured once
    # EP = 2 halves the measured shard and moves bytes; EP = 1 moves none
    one, two = (r["expert_bytes_per_rank_measured"] for r in rows)
    assert two < 0.6 * one
    assert rows[0]["bytes_moved_per_step"] == 0 and rows[1]["bytes_moved_per_step"] > 0
    for name in ("plot.png", "predicted_vs_measured.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert (tmp_path / "table.md").read_text().count("\n") == 4  # header, rule, two points
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_plan_check_runs_the_best_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    main(["plan", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "2",
          "--gpu-mem-gib", "4", "--dtype", "fp32", "--micro-batch", "1,4", "--num-experts",
          "16384", "--check", "--steps", "2", "--data", str(tmp_path / "data"), "--json"])
    out = capsys.readouterr().out
    # a tiny dense part: ZeRO 1-2 buckets (2^20 values) outweigh what they partition
    assert "plan --check: ep=1 zero=0 micro_batch=4 lazy_adam, 2 ranks here" in out
    row = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert row["tokens_per_rank"] == 4 * 32 and row["zero_stage"] == 0
    assert abs(row["peak_rel_err"]) < 0.10, row
