"""peer-scale measure, calibrate and plan --check on tiny grids: runs of the real trainer (gloo
ranks, CPU), each measurement beside its prediction; the table, CSV, plot and TensorBoard files
are written. plan --check launches its runs as users do (fresh processes, one rank here);
measure and calibrate, whose subject is the grid, the fit and the rows, run theirs on ranks
forked from the tests' warm server (tests/forkranks.py): ~1 s a point instead of ~4-10 s. A
forked rank's peak RSS counts the server's pages, so those tests keep a runtime of their own.
The command that launches several ranks (torchrun) is checked as a command line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import forkranks
import pytest

from peer_dist.tools import scale
from peer_dist.tools.scale import main

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

KEYS = ("num_experts", "dim", "ep", "world_size", "zero_stage", "tokens_per_rank",
        "expert_bytes_per_rank_predicted", "expert_bytes_per_rank_measured",
        "peak_bytes_per_rank_predicted", "peak_bytes_per_rank_measured", "runtime", "step_s")


def _own_cache(tmp_path, monkeypatch) -> None:
    """A cache of the test's own (runtime and calibration), the C++ extensions kept where they
    are built already."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get(
        "TORCH_EXTENSIONS_DIR", os.path.join(home, "torch_extensions")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _forked_launch(world: int, argv: list[str], env: dict, timeout: float) -> tuple[int, str]:
    with tempfile.TemporaryDirectory(prefix="peer_scale_") as tmp:
        log = Path(tmp) / "log"
        code = forkranks.train(world, argv, log, env, timeout)
        return code, log.read_text() if log.exists() else ""


@pytest.fixture
def forked(monkeypatch):
    """peer-scale's points run on forked ranks (the launch itself: plan --check below)."""
    calls = []

    def launch(world, argv, env, timeout):
        calls.append(world)
        # CPU ranks: buffers of 1 MiB and up from the OS, so RSS follows live bytes (forked
        # ranks keep the parent's heap: the setting matters to launched ones)
        assert env["MALLOC_MMAP_THRESHOLD_"] == os.environ.get("MALLOC_MMAP_THRESHOLD_",
                                                               str(2 ** 20))
        return _forked_launch(world, argv, env, timeout)

    monkeypatch.setattr(scale, "launch", launch)
    return calls


def test_plan_check_runs_the_best_setting(tmp_path, capsys, monkeypatch):
    _own_cache(tmp_path, monkeypatch)
    main(["plan", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "1",
          "--gpu-mem-gib", "4", "--dtype", "fp32", "--micro-batch", "1,4", "--num-experts",
          "16384", "--check", "--steps", "2", "--data", str(tmp_path / "data"), "--json"])
    out = capsys.readouterr().out
    # a tiny dense part: ZeRO 1-2 buckets (2^20 values) outweigh what they partition
    assert "plan --check: ep=1 zero=0 micro_batch=4 lazy_adam, 1 rank here" in out
    row = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert row["tokens_per_rank"] == 4 * 32 and row["zero_stage"] == 0
    # the runtime from a minimal run, then the point: each a fresh process
    assert row["runtime_source"] == "minimal run" and row["runtime"] > 0
    assert abs(row["peak_rel_err"]) < 0.10, row


def test_several_ranks_launch_through_torchrun(monkeypatch):
    """A point of world size 2 is `python -m torch.distributed.run --standalone
    --nproc-per-node=2 -m peer_dist.train ARGV` (the command the CLI tests run), one rank the
    trainer alone, in a session of its own; the exit code and the output both streams come
    back."""
    seen = []

    class Proc:
        returncode = 3

        def __init__(self, cmd, **kw):
            seen.append((cmd, kw))

        def communicate(self, timeout=None):
            seen[-1][1]["waited"] = timeout
            return "out\nerr\n", None

    monkeypatch.setattr(scale.subprocess, "Popen", Proc)
    env = {"A": "1"}
    assert scale.launch(2, ["--config", "x.yaml"], env, 7.0) == (3, "out\nerr\n")
    assert scale.launch(1, ["--config", "x.yaml"], env, 7.0)[0] == 3
    (two, kw), (one, _) = seen
    assert two == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node=2", "-m", "peer_dist.train", "--config", "x.yaml"]
    assert one == [sys.executable, "-m", "peer_dist.train", "--config", "x.yaml"]
    assert kw["env"] is env and kw["waited"] == 7.0 and kw["start_new_session"]
    assert kw["stdout"] == subprocess.PIPE and kw["stderr"] == subprocess.STDOUT


def test_a_run_past_its_timeout_is_stopped_with_its_ranks(tmp_path):
    """torchrun starts each rank in a session of its own: killing the launch alone left them
    running (and a timeout ended in a traceback). Stopped, the agent stops its ranks first."""
    marker = f"train.run_dir={tmp_path / 'timed_out'}"
    code, out = scale.launch(2, ["--config", str(TINY), marker], dict(os.environ), 4.0)
    assert code == scale.LAUNCH_TIMEOUT
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker.encode() in (proc / "cmdline").read_bytes():
                left.append(proc.name)
    assert not left, (left, out[-2000:])


def test_a_stop_signal_ends_peer_scale_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        scale._interrupt(signal.SIGTERM, None)  # the handler main installs for SIGTERM

    monkeypatch.setattr(scale, "cmd_predict", interrupted)
    with pytest.raises(SystemExit) as e:
        scale.main(["predict"])
    assert e.value.code == 128 + signal.SIGTERM  # the status of the signal
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("peer-scale predict: stopped by SIGTERM (its runs")
    assert signal.getsignal(signal.SIGTERM) is not scale._interrupt  # restored


def test_more_ranks_than_this_machine_runs_is_refused_before_any_run(monkeypatch):
    from peer_dist.train import startup

    monkeypatch.setattr(startup, "cpu_cores", lambda: 1)
    monkeypatch.setattr("peer_dist.parallel.topology.pick_backend", lambda: "gloo")
    ran = []
    monkeypatch.setattr(scale, "measure_point", lambda *a: ran.append(a))
    args = scale.build_parser().parse_args(["measure", "--ep", "1,9", "--num-experts", "1024",
                                            "--dim", "8"])
    points, _ = scale.measure_points(args)
    with pytest.raises(SystemExit, match=r"world size=9: CPU ranks on this machine's 1 core"):
        scale.run_grid(args, points, Path("unused"), None, "measure")
    assert ran == []


def test_measure_tiny_grid(tmp_path, capsys, monkeypatch, forked):
    _own_cache(tmp_path, monkeypatch)  # no calibration: the runtime by a minimal run, here
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
        # its table terms by hand (fp32 U and V of 4096 / EP rows, two fp32 moments each)
        assert r["expert_params"] == (4096 // r["ep"]) * 32 * 2 * 4
        assert r["expert_optim"] == 2 * r["expert_params"]
        assert r["step_s"] > 0
        # no calibration here: every point is validation, the runtime from a minimal run
        assert r["split"] == "validation" and r["runtime_source"] == "minimal run"
        assert r["modelled_bytes_predicted"] == r["peak_bytes_per_rank_predicted"] - r["runtime"]
        assert r["modelled_bytes_measured"] == r["peak_bytes_per_rank_measured"] - r["runtime"]
        assert r["modelled_rel_err"] == pytest.approx(
            r["modelled_bytes_predicted"] / r["modelled_bytes_measured"] - 1)
    cache = json.loads((tmp_path / "cache" / "peer_dist" / "runtime_bytes.json").read_text())
    assert len(cache) == 1 and list(cache.values())[0] == rows[0]["runtime"]  # measured once
    assert forked == [2, 2, 2]  # the minimal run, then the two points
    # EP = 2 halves the measured shard and moves bytes; EP = 1 moves none
    one, two = (r["expert_bytes_per_rank_measured"] for r in rows)
    assert two < 0.6 * one
    assert rows[0]["bytes_moved_per_step"] == 0 and rows[1]["bytes_moved_per_step"] > 0
    for name in ("plot.png", "predicted_vs_measured.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert (tmp_path / "table.md").read_text().count("\n") == 4  # header, rule, two points
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_calibrate_then_measure_apart(tmp_path, capsys, monkeypatch, forked):
    """calibrate fits the runtime, the scratch per token and per selection on 4 points and
    stores them with their provenance; measure with that file marks a calibrated point
    `calibration` and a new one `validation`, and predicts the new one's peak within 5%."""
    _own_cache(tmp_path, monkeypatch)
    common = ["--config", str(TINY), "--dim", "32", "--ep", "1", "--world-size", "1",
              "--heads", "2", "--steps", "3", "--data", str(tmp_path / "data"),
              "--data-bytes", "300000"]
    main(["calibrate", *common, "--num-experts", "256", "--tokens-per-rank", "32,1024",
          "--topk", "2,8", "--out", str(tmp_path / "cal"), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert cal == json.loads((tmp_path / "cache" / "peer_dist" / "calibration.json").read_text())
    assert len(rows) == len(cal["points"]) == 4 and {r["split"] for r in rows} == {"calibration"}
    assert cal["device"] == "cpu" and set(cal["selection_scratch"]) == {"local", "token"}
    assert cal["provenance"]["command"].startswith("peer-scale calibrate --config")
    assert len(cal["runtime"]) == 1 and list(cal["runtime"].values())[0] > 100 * 2 ** 20
    for r in rows:  # the fitted constants reproduce the points they were fitted on, given
        # each point's own routing (its measured gradient rows)
        assert abs(r["fit_rel_err"]) < 0.03 and r["fit_rel_err"] == pytest.approx(
            r["peak_rel_err_given_routing"], abs=1e-4)
        assert 0 < r["grad_rows_measured"] <= 256
    # the routing law from the counted rows: D = K T^beta queries, below one per token; one
    # rank and one N here, so the other exponents keep their defaults
    k, beta, gamma, delta = cal["routing"]["law"]
    assert 0 < k and 0 < beta < 1.5 and k * 1024 ** beta < 1024, cal["routing"]
    assert (gamma, delta) == (1.0, 0.0)
    main(["measure", *common, "--num-experts", "256,4096", "--tokens-per-rank", "1024",
          "--topk", "8", "--calibration", str(tmp_path / "cal" / "calibration.json"),
          "--out", str(tmp_path / "m"), "--json"])
    seen, new = [json.loads(line) for line in capsys.readouterr().out.splitlines()
                 if line.startswith("{")]
    assert (seen["num_experts"], seen["split"]) == (256, "calibration")
    assert (new["num_experts"], new["split"]) == (4096, "validation")
    for r in (seen, new):
        assert r["runtime_source"] == "calibration"
        assert r["runtime"] == list(cal["runtime"].values())[0]
    assert abs(new["peak_rel_err"]) < 0.05, new
    with pytest.raises(SystemExit, match="--calibration .*: no such file"):
        main(["measure", *common, "--num-experts", "4096", "--calibration",
              str(tmp_path / "none.json")])

