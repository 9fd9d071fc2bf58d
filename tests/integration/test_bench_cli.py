"""peer-bench dist through its command (it launches torchrun itself): a 2-rank smoke run of
every strategy and the replicated baseline, checked against by-hand bytes and memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from oneline import refused
from train_cli_helpers import ROOT, TIMEOUT, env

N, D, HEADS, TOPK, TOKENS = 4096, 16, 2, 4, 64


@pytest.fixture(scope="module")
def dist_rows() -> list[dict]:
    cmd = [sys.executable, "-m", "peer_dist.tools.bench", "dist", "--nprocs-list", "2",
           "--num-experts", str(N), "--dim", str(D), "--heads", str(HEADS), "--topk", str(TOPK),
           "--tokens", str(TOKENS), "--steps", "2", "--warmup", "1", "--threads", "1",
           "--json", "--no-paper", "--interleave"]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 rank(s) on 1 node(s)" in done.stderr  # progress on stderr, rows on stdout
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_dist_rows_cover_every_strategy(dist_rows):
    assert [r["strategy"] for r in dist_rows] == ["fetch", "dispatch", "replicated"]
    for r in dist_rows:
        assert (r["world_size"], r["ep"], r["nodes"], r["tokens_per_rank"]) == (2, 2, 1, TOKENS)
        assert r["step_s"] > 0 and r["step_s_predicted"] > 0 and r["source"] == "measured"
        assert r["bytes_internode_per_token_layer"] == 0  # one node
        # the step model's constants, measured in this world (W = 2: the links' too)
        k = r["model_constants"]
        assert set(k) == {"mix_s_per_token", "sync_s", "a2a_latency_s", "a2a_bytes_per_s",
                          "allreduce_bytes_per_s", "stream_bytes_per_s", "fresh_bytes_per_s",
                          "gather_bytes_per_s", "sync_fetch_s", "collective_s",
                          "plan_s_per_selection"}
        assert all(v > 0 for k_, v in k.items() if k_ != "collective_s")
        assert k["collective_s"] >= 0
        # collectives counted at the calls, as the model counts them: fetch 6, dispatch 5,
        # replicated 2 (U's and V's all-reduce)
        want = {"fetch": 6, "dispatch": 5, "replicated": 2}[r["strategy"]]
        assert r["collectives_per_step"] == r["collectives_per_step_predicted"] == want
        # --interleave: one-rank steps between the world's, on rank 0 alone and on every
        # rank at once (not the baseline's)
        if r["strategy"] == "replicated":
            assert "solo_step_s" not in r and "solo_all_step_s" not in r
        else:
            assert r["solo_step_s"] > 0 and r["solo_all_step_s"] > 0


def test_dist_memory_and_replicated_bytes_by_hand(dist_rows):
    rows = {r["strategy"]: r for r in dist_rows}
    table = N * D * 2 * 4  # U and V, fp32
    assert rows["fetch"]["expert_mem_bytes_per_rank"] == table // 2  # EP = 2: half the rows
    assert rows["dispatch"]["expert_mem_bytes_per_rank"] == table // 2
    assert rows["replicated"]["expert_mem_bytes_per_rank"] == table
    # replicated: a ring all-reduce of dense U, V gradients sends 2 (W-1)/W of them per step
    assert rows["replicated"]["bytes_per_token_layer"] == 2 * (1 / 2) * table / TOKENS


def test_dist_measured_bytes_near_the_cost_model(dist_rows):
    """Counted at the collectives for one draw of uniform ids, against the expectation."""
    for r in dist_rows:
        want = r["bytes_per_token_layer_predicted"]
        assert r["bytes_per_token_layer"] == pytest.approx(want, rel=0.2), r["strategy"]
    rows = {r["strategy"]: r for r in dist_rows}
    # dispatch moves a token's vector, fetch the rows it selected: fewer bytes at S = 8
    assert rows["dispatch"]["bytes_per_token_layer"] < rows["fetch"]["bytes_per_token_layer"]


HUGE = str(2 ** 40)  # passes the integer bound; tables of 2^40 rows fit no machine


@pytest.mark.parametrize("argv, flag, value", [
    (["--steps", "0"], "--steps", "0"),
    (["--steps", "2.5"], "--steps", "2.5"),  # 1e3 is 1000, as in a config
    (["--warmup", "-1"], "--warmup", "-1"),
    (["--ep", "3"], "--ep", "3"),  # divides none of 2, 4
    (["--ep", "2", "--nprocs-list", "1,2"], "--ep", "2"),
    (["--ep", "-1"], "--ep", "-1"),
    (["--dim", "0"], "--dim", "0"),
    (["--tokens", "0"], "--tokens", "0"),
    (["--threads", "-1"], "--threads", "-1"),
    (["--threads", "100000"], "--threads", "100000"),
    (["--rounds", "0"], "--rounds", "0"),
    (["--nodes", "0"], "--nodes", "0"),
    (["--nodes", "3"], "--nodes", "3"),  # divides no world size
    (["--num-experts", "1000"], "--num-experts", "1000"),
    (["--num-experts", "0"], "--num-experts", "0"),
    (["--heads", "0"], "--heads", "0"),
    (["--topk", "0"], "--topk", "0"),
    (["--topk", "1000"], "--topk", "1000"),  # > sqrt(512^2)
    (["--overlap-chunks", "0"], "--overlap-chunks", "0"),
    (["--overlap-chunks", "abc"], "--overlap-chunks", "abc"),
    (["--overlap-chunks", "8", "--tokens", "4"], "--overlap-chunks", "8"),
    (["--overlap-chunks", "1,65"], "--overlap-chunks", "to 64"),
    (["--nprocs-list", "0"], "--nprocs-list", "0"),
    (["--nprocs-list", "1000"], "--nprocs-list", "1000"),  # more ranks than the machine runs
    (["--nprocs-list", "1,,2"], "--nprocs-list", "1,,2"),  # an empty item: a typo
    (["--overlap-chunks", "1,"], "--overlap-chunks", "1,"),
    (["--strategies", "dispatch,,fetch"], "--strategies", "dispatch,,fetch"),
    (["--strategies", "foo"], "--strategies", "foo"),
    (["--strategies", "node_dispatch"], "--strategies", "node_dispatch"),  # one node
    (["--num-experts", HUGE], "--num-experts", HUGE),
    (["--tokens", HUGE], "--tokens", HUGE),
])
def test_dist_bad_flags_are_one_line_before_any_launch(argv, flag, value, capsys, monkeypatch):
    """Each bad value: status 2 and one line naming it, and no torchrun started (before: one
    launch per world size, each ending in ~50 lines and ChildFailedError)."""
    from peer_dist.tools import bench, bench_dist

    def launched(*a, **k):
        raise AssertionError(f"torchrun launched for {argv}")

    monkeypatch.setenv("PEER_BACKEND", "gloo")  # CPU ranks: 4 fit any machine (GPUs: not)
    monkeypatch.setattr(bench_dist, "launch", launched)
    monkeypatch.setattr(bench_dist.subprocess, "Popen", launched)
    line = refused(capsys, lambda: bench.main(["dist", "--nprocs-list", "2,4", *argv]))
    assert line.startswith("peer-bench dist: ") and flag in line and value in line, line


def test_dist_under_torchrun_is_one_line(capsys, monkeypatch):
    from peer_dist.tools import bench_dist

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(bench_dist, "launch", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(SystemExit) as e:
        bench_dist.main(["--nprocs-list", "1"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, flag, value", [
    (["--jobs", "0"], "--jobs", "0"),
    (["--jobs", "100000"], "--jobs", "100000"),  # compiler processes
    (["--latency-ns", "0"], "--latency-ns", "0"),
    (["--latency-ns", "nan"], "--latency-ns", "nan"),
    (["--latency-ns", "inf"], "--latency-ns", "inf"),
    (["--latency-ns", "-5"], "--latency-ns", "-5"),
    (["--latency-ns", "1e30"], "--latency-ns", "1e30"),
    (["--latency-ns", ""], "--latency-ns", "''"),
    (["--dims", ""], "--dims", "''"),
    (["--dims", "0"], "--dims", "0"),
    (["--dims", "abc"], "--dims", "abc"),
    (["--dims", str(10 ** 30)], "--dims", str(10 ** 30)),
    (["--archs", "70"], "--archs", "70"),
    (["--archs", ""], "--archs", "''"),
    (["--dtypes", "fp16"], "--dtypes", "fp16"),
])
def test_kernels_bad_flags_are_one_line(argv, flag, value, capsys, monkeypatch):
    from peer_dist.tools import bench, bench_kernels

    monkeypatch.setattr(bench_kernels, "measure_all",
                        lambda *a, **k: pytest.fail(f"compiles started for {argv}"))
    line = refused(capsys, lambda: bench.main(["kernels", *argv]))
    assert line.startswith("peer-bench kernels: ") and flag in line and value in line, line
