"""peer-scale measure on a tiny grid: torchrun runs of the real trainer (2 gloo ranks, CPU),
each measurement beside its prediction; the table, CSV, plot and TensorBoard files are written."""

from __future__ import annotations

import json
from pathlib import Path

from peer_dist.tools.scale import main

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

KEYS = ("num_experts", "dim", "ep", "world_size", "expert_bytes_per_rank_predicted",
        "expert_bytes_per_rank_measured", "peak_bytes_per_rank", "step_s")


def test_measure_tiny_grid(tmp_path, capsys):
    main(["measure", "--config", str(TINY), "--num-experts", "4096", "--dim", "32",
          "--ep", "1,2", "--world-size", "2", "--steps", "3", "--data-bytes", "300000",
          "--out", str(tmp_path), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [(r["ep"], r["world_size"]) for r in rows] == [(1, 2), (2, 2)]
    for r in rows:
        assert all(r.get(k) is not None for k in KEYS), r
        # tables + lazy_adam moments: 3 * rows * d * 2 tables * 4 B, rows = 4096 / EP
        assert r["expert_bytes_per_rank_predicted"] == 3 * (4096 // r["ep"]) * 32 * 2 * 4
        err = abs(r["expert_bytes_per_rank_measured"] / r["expert_bytes_per_rank_predicted"] - 1)
        assert err < 0.10, r
        assert r["peak_bytes_per_rank"] > r["expert_bytes_per_rank_measured"]
        assert r["step_s"] > 0
    # EP = 2 halves the measured shard and moves bytes; EP = 1 moves none
    one, two = (r["expert_bytes_per_rank_measured"] for r in rows)
    assert two < 0.6 * one
    assert rows[0]["bytes_moved_per_step"] == 0 and rows[1]["bytes_moved_per_step"] > 0
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert (tmp_path / "table.md").read_text().count("\n") == 4  # header, rule, two points
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
