"""peer-scale plan: the fewest GPUs for a model (--min-gpus), the optimizer filter, the ranking
rule printed with the table, and the plot with the GPU's capacity."""

from __future__ import annotations

import json

import pytest

from peer_dist.tools import scale

GIB = 1024 ** 3
MODEL = ["--num-experts", "1048576", "--dim", "1024", "--layers", "4"]


def _args(*extra: str):
    return scale.build_parser().parse_args(["plan", "--gpus-per-node", "8", "--gpu-mem-gib",
                                            "16", *MODEL, *extra])


def test_min_gpus_is_the_fewest_that_fit(capsys, tmp_path):
    args = _args("--min-gpus", "--table-optimizer", "lazy_adam", "--out", str(tmp_path))
    g, rows, tried = scale.min_gpus(args)
    # by hand: 4 layers x 2 tables x 2^20 x 1024 fp32 = 32 GiB of tables, 64 GiB of Adam
    # moments: 96 GiB over g ranks must leave room in 16 GiB less 5%: g = 7 is the first
    assert g == 7 and [n for n, _ in tried] == [1, 2, 3, 4, 5, 6, 7]
    assert all(not r["fits"] for n in range(1, 7) for r in scale.plan_rows(args, world=n))
    best = next(r for r in rows if r["fits"])
    assert best["world_size"] == 7 and best["ep"] == 7 and best["table_optimizer"] == "lazy_adam"
    assert best["peak_bytes_per_rank_predicted"] <= 0.95 * 16 * GIB
    scale.main(["plan", "--gpus-per-node", "8", "--gpu-mem-gib", "16", *MODEL, "--min-gpus",
                "--table-optimizer", "lazy_adam", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("fewest GPUs: 7 (1 node of 8, 16 GiB each); best layout there: ep=7")
    assert scale.RANK_RULE in out
    assert (tmp_path / "plan.png").stat().st_size > 10_000


def test_min_gpus_counts_whole_nodes_after_the_first():
    assert scale.gpu_counts(4, 20) == [1, 2, 3, 4, 8, 12, 16, 20]
    with pytest.raises(SystemExit, match="nothing fits on up to 3 GPUs"):
        scale.main(["plan", "--gpus-per-node", "8", "--gpu-mem-gib", "16", *MODEL,
                    "--min-gpus", "--max-gpus", "3", "--table-optimizer", "lazy_adam"])


def test_optimizer_filter_and_rule_with_the_table(capsys, tmp_path):
    scale.main(["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "16", *MODEL,
                "--table-optimizer", "adagrad,sgd", "--json", "--top", "1000"])
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows and {r["table_optimizer"] for r in rows} == {"adagrad", "sgd"}
    assert rows[0]["table_optimizer"] == "adagrad"  # ranked before sgd
    scale.main(["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "16", *MODEL,
                "--out", str(tmp_path)])
    assert f"best first ({scale.RANK_RULE}):" in capsys.readouterr().out
    assert (tmp_path / "plan.md").read_text().startswith(scale.RANK_RULE)
    assert (tmp_path / "plan.png").is_file()
    with pytest.raises(SystemExit, match=r"--table-optimizer=adam: \['adam'\] unknown"):
        scale.main(["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "16",
                    "--table-optimizer", "adam"])
    with pytest.raises(SystemExit, match="plan needs --nodes N"):
        scale.main(["plan", "--gpus-per-node", "8", "--gpu-mem-gib", "16"])


def test_a_cpu_calibration_below_zero_is_not_applied_on_a_gpu(tmp_path):
    """A CPU's scratch corrections below zero are dropped in a GPU plan (its peak is the
    allocator's); a GPU calibration's are applied as they are."""
    cal = {"device": "cpu", "runtime": {}, "points": [],
           "selection_scratch": {"token": -5000, "dispatch": -100, "local": -100}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(cal))
    rows = scale.plan_rows(_args("--nodes", "1", "--calibration", str(path)))
    assert rows and all(r["scratch_bytes"] == 0 for r in rows)
    path.write_text(json.dumps({**cal, "device": "cuda"}))
    for r in scale.plan_rows(_args("--nodes", "1", "--calibration", str(path))):
        assert r["scratch_bytes"] == r["tokens_per_rank"] * (-5000 - 100 * r["heads"] * r["topk"])


def test_a_calibration_with_a_malformed_routing_law_is_refused_in_one_line(tmp_path):
    cal = {"device": "cpu", "runtime": {}, "points": [], "selection_scratch": {},
           "routing": {"law": [1.0, float("nan"), 1.0, 0.0]}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(cal))
    with pytest.raises(SystemExit, match=r"not a calibration file .*routing law .*not 4 finite"):
        scale.plan_rows(_args("--nodes", "1", "--calibration", str(path)))


def test_grid_ep_zero_is_the_whole_world_and_bad_degrees_are_one_line():
    """--ep 0 divided by zero (a traceback); it is the whole world, as parallel.ep=0."""
    def grid(*argv):
        args = scale.build_parser().parse_args(["predict", *argv])
        scale.fill_grid_defaults(args, "predict")
        return scale.grid(args)

    for argv in (["--ep", "0"], ["--ep", "-1"], ["--ep", "2", "--world-size", "0"]):
        with pytest.raises(SystemExit, match=r"allowed are --ep >= 1, or 0 \(the whole world\)"):
            grid(*argv)
    (point,) = grid("--ep", "0", "--world-size", "4", "--num-experts", "1024", "--dim", "8")
    assert (point.ep, point.world_size) == (4, 4)
