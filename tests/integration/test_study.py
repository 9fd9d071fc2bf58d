"""peer-study on budgets small enough for a test: every kind trains at its budget, the tables
and the plot are written, expert statistics come out in range."""

from __future__ import annotations

import json
import math

from peer_dist.tools.study import main

KEYS = ("kind", "params", "active_params", "flops_per_token", "train_flops", "budget",
        "routing", "seed", "selection_ppl", "test_ppl")


def test_isoflop_trains_every_kind_at_its_budget(tmp_path, capsys):
    main(["isoflop", "--budgets", "5e9", "--sizes", "32", "--seeds", "0,1", "--max-extend",
          "0", "--kinds", "dense,moe,pkm,peer,moe_ec", "--data", str(tmp_path / "data"),
          "--data-bytes", "400000", "--out", str(tmp_path), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert sorted({r["kind"] for r in rows}) == ["dense", "moe", "moe_ec", "peer", "pkm"]
    assert len(rows) == 10  # 5 kinds x 1 width x 2 seeds, no extension
    for r in rows:
        assert all(k in r for k in KEYS), r
        step_flops = r["flops_per_token"] * 16 * 64
        assert abs(r["train_flops"] - r["budget"]) <= step_flops / 2  # matched on compute
        for key in ("selection_ppl", "test_ppl"):
            assert 1.0 < r[key] < 256 and math.isfinite(r[key])  # better than uniform
        assert r["selection_ppl"] != r["test_ppl"]  # two different halves of held-out text
        assert r["active_params"] <= r["params"]
    routing = {r["kind"]: (r["routing"], r["causal"]) for r in rows}
    assert routing == {"dense": (None, True), "moe": ("token", True), "pkm": (None, True),
                       "peer": (None, True), "moe_ec": ("expert", False)}
    peer = next(r for r in rows if r["kind"] == "peer")
    dense = next(r for r in rows if r["kind"] == "dense")
    assert peer["params"] > dense["params"]  # a million-expert layer in miniature
    seeds = [r["test_ppl"] for r in rows if r["kind"] == "peer"]
    assert seeds[0] != seeds[1]  # two seeds really differ
    table = (tmp_path / "isoflop.md").read_text()
    assert "Best width per kind" in table and table.count("| 5.0e+09 |") == 10
    assert "| moe_ec (non-causal, not ranked) |" in table
    best = table.split("Best width per kind")[1].splitlines()
    ranked = [line.split(" | ")[1] for line in best if line.startswith("| 5.0e+09")]
    assert ranked[-1].startswith("moe_ec")  # after every causal kind
    dense_ppl = (dense["test_ppl"] + next(r for r in rows if r["kind"] == "dense"
                                          and r["seed"] == 1)["test_ppl"]) / 2
    peer_ppl = sum(seeds) / 2
    assert f"| {100 * (peer_ppl / dense_ppl - 1):+.1f}% |" in table  # gap to dense
    assert (tmp_path / "isoflop.png").read_bytes().startswith(b"\x89PNG")
    assert len((tmp_path / "isoflop.csv").read_text().splitlines()) == 11


def test_isoflop_sweep_extends_until_the_optimum_is_inside(tmp_path, capsys, monkeypatch):
    """A fake trainer whose selection perplexity is lowest at d = 24: starting from 48, 64 the
    sweep adds 32, then 24, then 16, and stops (24 is inside 16..64)."""
    from peer_dist.tools import study

    def fake(kind, dim, budget, seed, data, r):
        ppl = 5.0 + abs(dim - 24) / 8 + 0.01 * seed
        return dict(kind=kind, routing=None, causal=True, dim=dim, seed=seed, budget=budget,
                    params=dim, active_params=dim, flops_per_token=1.0, steps=1, tokens=1,
                    train_flops=budget, selection_loss=math.log(ppl), test_loss=math.log(ppl),
                    selection_ppl=ppl, test_ppl=ppl + 1, train_s=0.0)

    monkeypatch.setattr(study, "isoflop_model", fake)
    monkeypatch.setattr(study, "open_corpus", lambda path, max_bytes: None)
    study.main(["isoflop", "--budgets", "1e10", "--kinds", "peer", "--sizes", "48,64",
                "--seeds", "0,1", "--max-extend", "3", "--out", str(tmp_path), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [r["dim"] for r in rows] == [48, 48, 64, 64, 32, 32, 24, 24, 16, 16]
    table = (tmp_path / "isoflop.md").read_text()
    assert "| 1.0e+10 | peer | 24 | yes | 6.005 | 0.010 |" in table
    assert study.next_width([24, 32], 24) == 16 and study.next_width([8, 32], 8) is None
    assert study.next_width([32, 48, 64], 48) is None and study.next_width([192, 256], 256) is None


def test_experts_scaling_table(tmp_path, capsys):
    main(["experts-scaling", "--num-experts", "64,256", "--dim", "32", "--steps", "8",
          "--seeds", "0,1", "--data", str(tmp_path / "data"), "--data-bytes", "400000",
          "--out", str(tmp_path), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [(r["num_experts"], r["seed"]) for r in rows] == [(64, 0), (64, 1), (256, 0),
                                                              (256, 1)]
    small, big = rows[0], rows[2]
    # same d, h, k: the same expert FLOPs; only the sub-key scores grow (2 H sqrt(N) d_key x 3)
    assert big["flops_per_token"] - small["flops_per_token"] == 3 * 2 * 4 * (16 - 8) * 32
    assert big["params"] - small["params"] == 2 * (256 - 64) * 32 + 4 * 2 * (16 - 8) * 16
    for r in rows:
        assert 0 < r["usage"] <= 1 and 1.0 < r["test_ppl"] < 256
    table = (tmp_path / "experts_scaling.md").read_text().splitlines()
    mean = (rows[0]["test_ppl"] + rows[1]["test_ppl"]) / 2
    assert table[4].startswith("| 64 |") and f"| {mean:.3f} |" in table[4]
    assert (tmp_path / "experts_scaling.png").read_bytes().startswith(b"\x89PNG")


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
