"""peer-scale plan: the fewest GPUs for a model (--min-gpus), the optimizer filter, the ranking
rule printed with the table, and the plot with the GPU's capacity."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from oneline import refused

from peer_dist.config import Config
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


@pytest.mark.parametrize("model,gibs,want", [
    (MODEL, ("0.5", "2", "6", "16", "40"), [0, 0, 8, 3, 1]),
    (["--num-experts", "16384", "--dim", "256"], ("0.02", "0.04", "0.06", "0.08", "0.15"),
     [0, 8, 3, 2, 1]),
])
def test_min_gpus_screen_at_the_smallest_micro_batch_loses_nothing(model, gibs, want):
    """--min-gpus prices each world at the smallest micro-batch only (1/6 of the rows: the
    search over 4,096 GPUs took 4 min): the premise, every layout's peak grows with the
    micro-batch, and the answer against pricing every row."""
    for world in (1, 3, 8, 24):
        args = scale.build_parser().parse_args(["plan", "--gpus-per-node", "8", "--gpu-mem-gib",
                                                "16", *model])
        by_layout: dict[tuple, list] = {}
        for r in scale.plan_rows(args, world=world):
            by_layout.setdefault((r["ep"], r["zero_stage"], r["table_optimizer"]), []).append(
                (r["micro_batch"], r["peak_bytes_per_rank_predicted"]))
        for peaks in by_layout.values():
            ordered = [p for _, p in sorted(peaks)]
            assert len(ordered) == 6 and ordered == sorted(ordered)
    found = []
    for gib in gibs:
        args = scale.build_parser().parse_args(["plan", "--gpus-per-node", "4", "--gpu-mem-gib",
                                                gib, *model, "--min-gpus", "--max-gpus", "24"])
        every = next((g for g in scale.gpu_counts(4, 24)
                      if any(r["fits"] for r in scale.plan_rows(args, world=g))), 0)
        g, rows, _ = scale.min_gpus(args)
        found.append(g)
        assert g == every
        assert rows == (scale.plan_rows(args, world=g) if g else [])
    assert found == want  # nothing, a node and more, one GPU and a few


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
    with pytest.raises(SystemExit):  # an unknown name: refused by the flag (see below)
        scale.main(["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "16",
                    "--table-optimizer", "adam"])
    assert "argument --table-optimizer: 'adam' is invalid" in capsys.readouterr().err
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

    with pytest.raises(SystemExit, match=r"allowed are --ep >= 1, or 0 \(the whole world\)"):
        grid("--ep", "0")
    for argv in (["--ep", "-1"], ["--ep", "2", "--world-size", "0"]):  # refused by the flags
        with pytest.raises(SystemExit) as e:
            grid(*argv)
        assert e.value.code == 2
    (point,) = grid("--ep", "0", "--world-size", "4", "--num-experts", "1024", "--dim", "8")
    assert (point.ep, point.world_size) == (4, 4)


def test_a_set_of_a_key_the_command_leaves_to_the_config_is_used(capsys):
    """--set keys the grid does not set reach every point (the refused ones: BAD_INPUTS)."""
    scale.main(["predict", "--num-experts", "4096", "--dim", "64", "--ep", "1", "--json",
                "--set", "model.peer.heads=4", "--set", "model.peer.topk=2",
                "--set", "train.batch_size=3"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["heads"], row["topk"]) == (4, 2)
    assert row["tokens_per_rank"] == 3 * Config().train.seq_len
    scale.main([*PLAN, "--nodes", "1", "--set", "model.dim=512", "--set",
                "model.peer.num_experts=16384", "--json", "--top", "1"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["dim"], row["num_experts"]) == (512, 16384)


# --------------------------------------------------------------------------- user errors

PLAN = ["plan", "--gpus-per-node", "8", "--gpu-mem-gib", "80"]
CHECK = [*PLAN, "--nodes", "1", "--check"]
GRID = ["--num-experts", "1024", "--dim", "8"]
# (argv, what stderr's one line must name: the flag and the bad value); FILE: an existing file
BAD_INPUTS = [
    ([*PLAN, "--nodes", "0"], "--nodes", "'0'"),
    ([*PLAN, "--nodes", "-1"], "--nodes", "'-1'"),
    ([*PLAN, "--nodes", str(10 ** 30)], "--nodes", str(10 ** 30)),
    (["plan", "--nodes", "1", "--gpus-per-node", "0", "--gpu-mem-gib", "80"], "--gpus-per-node",
     "'0'"),
    ([*PLAN, "--nodes", "1", "--micro-batch", "0"], "--micro-batch", "'0'"),
    ([*PLAN, "--nodes", "1", "--micro-batch", ""], "--micro-batch", "''"),
    ([*PLAN, "--min-gpus", "--max-gpus", "0"], "--max-gpus", "'0'"),
    ([*PLAN, "--nodes", "1", "--num-experts", "1000"], "--num-experts", "'1000'"),
    ([*PLAN, "--nodes", "1", "--num-experts", "9"], "--num-experts=9", "topk=16"),
    ([*PLAN, "--nodes", "1", "--dim", "5"], "--dim=5", "model.n_heads"),
    (["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "0"], "--gpu-mem-gib",
     "'0'"),
    (["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "nan"], "--gpu-mem-gib",
     "'nan'"),
    (["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "-5"], "--gpu-mem-gib",
     "'-5'"),
    (["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "inf"], "--gpu-mem-gib",
     "'inf'"),
    ([*PLAN, "--nodes", "1", "--headroom", "nan"], "--headroom", "'nan'"),
    ([*PLAN, "--nodes", "1", "--headroom", "-0.5"], "--headroom", "'-0.5'"),
    ([*PLAN, "--nodes", "1", "--headroom", "2"], "--headroom", "'2'"),
    ([*PLAN, "--nodes", "1", "--headroom", "1"], "--headroom", "'1'"),
    ([*PLAN, "--nodes", "1", "--out", "FILE"], "--out=", "is a file"),
    ([*PLAN, "--nodes", "1", "--out", "FILE/sub"], "--out=", "is a file"),
    ([*PLAN, "--nodes", "1", "--out", ""], "--out=", "''"),
    ([*PLAN, "--nodes", "1", "--top", "0"], "--top", "'0'"),
    ([*PLAN, "--nodes", "1", "--runtime-bytes", "-1"], "--runtime-bytes", "'-1'"),
    ([*PLAN, "--nodes", "1", "--table-optimizer", ""], "--table-optimizer", "''"),
    ([*CHECK, "--steps", "0"], "--steps", "'0'"),
    ([*CHECK, "--timeout", "0"], "--timeout", "'0'"),
    ([*CHECK, "--timeout", "-1"], "--timeout", "'-1'"),
    ([*CHECK, "--timeout", "nan"], "--timeout", "'nan'"),
    ([*CHECK, "--timeout", "1e7"], "--timeout", "'1e7'"),  # beyond what a subprocess waits
    ([*CHECK, "--data-bytes", "-1"], "--data-bytes", "'-1'"),
    ([*PLAN, "--nodes", "8", "--check"], "world size=64", "allowed is 1 to"),
    (["plan", "--cluster", "2x8:h100", "--nodes", "2"], "--cluster='2x8:h100'", "--nodes"),
    (["plan", "--cluster", "100000x8:h100"], "--cluster='100000x8:h100'", "800000 GPUs"),
    (["plan", "--cluster", ""], "--cluster=", "''"),
    ([*PLAN, "--min-gpus", "--nodes", "2"], "--min-gpus", "--nodes"),
    ([*PLAN, "--nodes", "1", "--calibration", ""], "--calibration=", "''"),
    (["predict", "--num-experts", "0"], "--num-experts", "'0'"),
    (["predict", "--num-experts", "1000"], "--num-experts", "'1000'"),
    (["predict", "--num-experts", ""], "--num-experts", "''"),
    (["predict", "--num-experts", str(10 ** 30)], "--num-experts", str(10 ** 30)),
    (["predict", "--dim", "0"], "--dim", "'0'"),
    (["predict", "--dim", "5"], "--dim=5", "model.n_heads"),
    (["predict", "--layers", "-2"], "--layers", "'-2'"),
    (["predict", "--heads", "0"], "--heads", "'0'"),
    (["predict", "--topk", "0"], "--topk", "'0'"),
    (["predict", "--num-experts", "4096", "--topk", "100"], "--topk=100", "sqrt(num_experts)"),
    (["predict", "--zero-stage", "4"], "--zero-stage", "'4'"),
    (["predict", "--zero-stage", "-1"], "--zero-stage", "'-1'"),
    (["predict", "--tokens-per-rank", "0"], "--tokens-per-rank", "'0'"),
    (["predict", "--tokens-per-rank", str(10 ** 30)], "--tokens-per-rank", str(10 ** 30)),
    (["predict", "--world-size", "0"], "--world-size", "'0'"),
    (["predict", "--ep", "-1"], "--ep", "'-1'"),
    (["predict", "--ep", "0"], "--ep=0", "--world-size"),
    (["predict", "--ep", "3", "--world-size", "4"], "--ep=3", "--world-size=4"),
    (["predict", "--dtype", "fp16"], "--dtype", "'fp16'"),
    (["predict", "--dtype", ""], "--dtype", "''"),
    (["predict", "--table-optimizer", ""], "--table-optimizer", "''"),
    (["predict", "--strategy", "bogus"], "--strategy", "'bogus'"),
    (["predict", "--gpu-mem-gib", "nan"], "--gpu-mem-gib", "'nan'"),
    (["predict", "--runtime-bytes", "-5"], "--runtime-bytes", "'-5'"),
    (["predict", *GRID, "--out", "FILE"], "--out=", "is a file"),
    (["predict", *GRID, "--out", "/proc/x"], "--out='/proc/x' is invalid",
     "a folder cannot be made or written in '/proc'"),
    ([*PLAN, "--nodes", "1", "--out", "/proc/x/y"], "--out='/proc/x/y' is invalid", "'/proc'"),
    (["measure", *GRID, "--out", "/proc/x"], "--out='/proc/x' is invalid", "'/proc'"),
    (["measure", *GRID, "--data", "/proc/x"], "--data='/proc/x' is invalid", "'/proc'"),
    (["predict", "--config", "/nonexistent/x.yaml"], "config file", "/nonexistent/x.yaml"),
    (["measure", "--steps", "0"], "--steps", "'0'"),
    (["measure", "--timeout", "0"], "--timeout", "'0'"),
    (["measure", "--timeout", "1e9"], "--timeout", "'1e9'"),
    (["measure", "--data-bytes", "0"], "--data-bytes", "'0'"),
    (["measure", *GRID, "--world-size", "100"], "world size=100", "allowed is 1 to"),
    (["measure", *GRID, "--data", "FILE"], "--data=", "is a file"),
    (["measure", "--grid", "validation", "--dim", "64"], "--grid validation", "grid flags"),
    # a --set of a key the command sets itself would be replaced without a word
    (["predict", "--set", "model.dim=64"], "--set 'model.dim=64'", "give --dim instead"),
    (["predict", "--heads", "8", "--set", "model.peer.heads=4"], "model.peer.heads=4",
     "give --heads instead"),
    (["measure", "--set", "model.peer.heads=4"], "model.peer.heads=4",
     "each point of the validation grid has its own"),
    (["measure", *GRID, "--set", "train.steps=5"], "train.steps=5", "give --steps instead"),
    (["measure", *GRID, "--set", "train.batch_size=2"], "train.batch_size=2",
     "give --tokens-per-rank instead"),
    (["calibrate", "--set", "data.path=x"], "data.path=x", "give --data instead"),
    ([*PLAN, "--nodes", "1", "--set", "parallel.ep=2"], "parallel.ep=2", "it ranks every EP"),
    ([*PLAN, "--nodes", "1", "--set", "train.dtype=fp32"], "train.dtype=fp32",
     "give --dtype instead"),
    ([*CHECK, "--set", "train.resume=auto"], "train.resume=auto", "sets train.resume itself"),
    (["calibrate", "--steps", "-1"], "--steps", "'-1'"),
    (["calibrate", "--refit", ""], "--refit=", "''"),
    (["calibrate", *GRID, "--refit", "/nonexistent.json"], "--refit /nonexistent.json",
     "no such file"),
]


@pytest.mark.parametrize("argv,flag,value", BAD_INPUTS,
                         ids=[" ".join(a[1:]) or "empty" for a, _, _ in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_status_2_before_any_work(argv, flag, value, capsys,
                                                              tmp_path, monkeypatch):
    if "/proc/x" in " ".join(argv) and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here: a path no folder can be made at")
    from peer_dist.train import startup

    def no_runs(*_args, **_kw):
        raise AssertionError("a run was started")

    monkeypatch.setattr(scale, "launch", no_runs)  # nothing a bad input reaches may run
    monkeypatch.setattr(scale, "measure_point", no_runs)
    for name in ("write_outputs", "plot_plan", "plot_min_gpus", "write_measure"):
        monkeypatch.setattr(scale, name, no_runs)  # nor write: /proc/x was found only there
    monkeypatch.setattr(startup, "cpu_cores", lambda: 1)  # 8 CPU ranks at most, here
    monkeypatch.setattr("peer_dist.parallel.topology.pick_backend", lambda: "gloo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no calibration of this host
    file = tmp_path / "a_file"
    file.write_text("")
    argv = [a.replace("FILE", str(file)) for a in argv]
    line = refused(capsys, lambda: scale.main(argv))
    assert flag in line and value in line, line
    assert not (tmp_path / "a_file").is_dir()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_measure_is_one_line_with_the_status_of_its_signal(sig, capsys, tmp_path,
                                                                     monkeypatch):
    """Ctrl-C (or SIGTERM) during measure was one line but status 1: now 130 (143)."""
    def stopped(_args):
        raise KeyboardInterrupt(*([] if sig == signal.SIGINT else [sig.name]))

    monkeypatch.setattr(scale, "cmd_measure", stopped)
    with pytest.raises(SystemExit) as e:
        scale.main(["measure", *GRID, "--out", str(tmp_path / "out")])
    assert e.value.code == 128 + sig.value
    err = capsys.readouterr().err
    assert err.splitlines() == [f"peer-scale measure: stopped by {sig.name} (its runs stopped; "
                                "what was measured before is printed above)"], err


@pytest.mark.parametrize("flag,body,message", [
    ("--refit", b"\xff\xfe\x00garbage", "not a calibration file (not UTF-8 text)"),
    ("--refit", b'{"a": 1}', "not a calibration file (no key 'selection_scratch')"),
    ("--refit", None, "a folder (allowed: a calibration.json"),
    ("--calibration", b"{}", "--calibration='FILE' is invalid here: calibrate writes"),
])
def test_calibrate_names_a_file_it_cannot_use(capsys, monkeypatch, tmp_path, flag, body, message):
    """A binary --refit was a one-line dump of the decode error's bytes, a JSON without the
    keys a bare KeyError repr; --calibration was silently ignored and the runs started."""
    monkeypatch.setattr(scale, "measure_point", lambda *a: pytest.fail("a run started"))
    path = tmp_path / "f"
    if body is None:
        path.mkdir()
    else:
        path.write_bytes(body)
    line = refused(capsys, lambda: scale.main(
        ["calibrate", "--num-experts", "256", "--dim", "32", "--ep", "1", "--out",
         str(tmp_path / "out"), flag, str(path)]))
    assert message.replace("FILE", str(path)) in line, line


def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, capsys):
    """Garbage in the cached runtime_bytes.json was a JSONDecodeError traceback from measure;
    a damaged cached calibration.json was an error blaming --calibration, a flag not given."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = scale._cache_file()
    cache.parent.mkdir(parents=True)
    for junk in ("garbage", "[1, 2]", '{"k": "x"}'):
        cache.write_text(junk)
        assert scale._read_cache(cache) == {}
        assert "is damaged: ignored, and rewritten" in capsys.readouterr().err
    cache.write_text('{"k": 5}')
    assert scale._read_cache(cache) == {"k": 5}
    scale._cache_file("calibration.json").write_text("garbage")
    args = scale.build_parser().parse_args(["plan", "--gpus-per-node", "8", "--gpu-mem-gib",
                                            "16", *MODEL])
    assert scale.load_calibration(args) is None
    assert "cached calibration" in capsys.readouterr().err
    args.calibration = str(scale._cache_file("calibration.json"))  # named: the user's file
    with pytest.raises(SystemExit, match="--calibration .*: not a calibration file"):
        scale.load_calibration(args)
