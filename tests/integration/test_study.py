"""peer-study on budgets small enough for a test: every kind trains at its budget, the tables
and the plot are written, expert statistics come out in range."""

from __future__ import annotations

import json
import math

from peer_dist.tools.study import main

KEYS = ("kind", "params", "active_params", "flops_per_token", "train_flops", "val_ppl",
        "budget")


def test_isoflop_trains_every_kind_at_its_budget(tmp_path, capsys):
    main(["isoflop", "--budgets", "2e10", "--sizes", "32", "--seeds", "0,1", "--data",
          str(tmp_path / "data"), "--data-bytes", "400000", "--out", str(tmp_path), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert sorted({r["kind"] for r in rows}) == ["dense", "moe", "peer", "pkm"]
    assert len(rows) == 8  # 4 kinds x 1 width x 2 seeds
    for r in rows:
        assert all(k in r for k in KEYS), r
        step_flops = r["flops_per_token"] * 16 * 64
        assert abs(r["train_flops"] - r["budget"]) <= step_flops / 2  # matched on compute
        assert 1.0 < r["val_ppl"] < 256 and math.isfinite(r["val_ppl"])  # better than uniform
        assert r["active_params"] <= r["params"]
    peer = next(r for r in rows if r["kind"] == "peer")
    dense = next(r for r in rows if r["kind"] == "dense")
    assert peer["params"] > dense["params"]  # a million-expert layer in miniature
    seeds = [r["val_ppl"] for r in rows if r["kind"] == "peer"]
    assert seeds[0] != seeds[1]  # two seeds really differ
    table = (tmp_path / "isoflop.md").read_text()
    assert "Best width per kind" in table and table.count("| 2.0e+10 |") == 8
    assert (tmp_path / "isoflop.png").read_bytes().startswith(b"\x89PNG")
    assert len((tmp_path / "isoflop.csv").read_text().splitlines()) == 9


def test_experts_table(tmp_path, capsys):
    main(["experts", "--num-experts", "64,256", "--dim", "32", "--steps", "10", "--data",
          str(tmp_path / "data"), "--data-bytes", "400000", "--out", str(tmp_path), "--json",
          "--seeds", "0,1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [(r["num_experts"], r["query_batchnorm"], r["seed"]) for r in rows] == [
        (64, True, 0), (64, True, 1), (64, False, 0), (64, False, 1), (256, True, 0),
        (256, True, 1), (256, False, 0), (256, False, 1)]
    for r in rows:
        assert 0 < r["usage"] <= 1 and 0 <= r["unevenness"] <= math.log(r["num_experts"])
    assert rows[0]["usage"] != rows[1]["usage"]  # the seeds are different models
    table = (tmp_path / "experts.md").read_text().splitlines()
    assert len(table) == 8 and table[0] == "Mean over seeds [0, 1]; spread = max - min."
    first = rows[0], rows[1]
    mean = sum(r["unevenness"] for r in first) / 2
    spread = abs(first[0]["unevenness"] - first[1]["unevenness"])
    assert table[4].startswith(f"| 64 | on | {(first[0]['usage'] + first[1]['usage']) / 2:.1%}")
    assert f"| {mean:.3f} | {spread:.3f} |" in table[4]
    assert len((tmp_path / "experts.csv").read_text().splitlines()) == 9
