"""peer-bench layer: the roofline's byte count by hand, its rows and refusals, and one tiny run
through the real command (children, JSON rows with device, dtype and roofline_fraction)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oneline import refused

from peer_dist.tools import bench_layer
from peer_dist.tools.memory_model import expected_unique


def _args(**kw) -> argparse.Namespace:
    return bench_layer._parser().parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_mix_bytes_by_hand():
    args = _args(num_experts=1024, dim=16, heads=2, topk=4)
    t, d, r = 32, 16, expected_unique(1024, 32 * 8)
    fwd = 2 * r * d * 4 + 2 * t * d * 4  # U, V rows once; x in, y out
    bwd = 2 * r * d * 4 * 2 + 3 * t * d * 4  # U, V rows again, du, dv out; x, dy in, dx out
    assert bench_layer.mix_bytes(args, t, "fwd_bwd", "fp32") == int(fwd + bwd)
    bf16 = bench_layer.mix_bytes(args, t, "fwd_bwd", "bf16")
    assert bf16 == int((fwd + bwd) / 2)  # every byte above halves
    adam = (3 * 4 + 2 * 2 * 4) * 2 * r * d  # p read+write, grad; two fp32 moments read+write
    step = bench_layer.mix_bytes(args, t, "step", "fp32", "fp32", "lazy_adam")
    assert step == int(fwd + bwd + adam)


def test_rows_and_refusals():
    rows = bench_layer._rows(_args(tokens="8,16", dtype="fp32,bf16", modes="fwd_bwd",
                                   impls="peer_dist"))
    assert [(r["tokens"], r["dtype"]) for r in rows] == [(8, "fp32"), (8, "bf16"),
                                                          (16, "fp32"), (16, "bf16")]
    with pytest.raises(SystemExit) as e:
        _args(dtype="fp16")
    assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_refused_in_one_line_without_a_gpu():
    done = subprocess.run([sys.executable, "-m", "peer_dist.tools.bench_layer", "--device",
                           "cuda"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "peer-bench layer: --device=cuda is invalid here: this torch sees no CUDA device "
        "(allowed: cpu) (see peer-bench layer --help)"]


HUGE = str(2 ** 40)  # passes the integer bound; tables of 2^40 rows fit no machine


@pytest.mark.parametrize("argv, flag, value", [
    (["--threads", "0"], "--threads", "0"),
    (["--threads", "100000"], "--threads", "100000"),  # beyond cli.MAX_THREADS (segfaulted)
    (["--threads", "1e4"], "--threads", "1e4"),
    (["--repeats", "0"], "--repeats", "0"),
    (["--repeats", "nan"], "--repeats", "nan"),
    (["--warmup", "-1"], "--warmup", "-1"),
    (["--check-tokens", "0"], "--check-tokens", "0"),
    (["--num-experts", "1000"], "--num-experts", "1000"),  # not a perfect square
    (["--num-experts", "0"], "--num-experts", "0"),
    (["--num-experts", str(10 ** 30)], "--num-experts", str(10 ** 30)),
    (["--dim", "0"], "--dim", "0"),
    (["--heads", "0"], "--heads", "0"),
    (["--topk", "0"], "--topk", "0"),
    (["--topk", "600"], "--topk", "600"),  # > sqrt(512 * 512)
    (["--d-key", "7"], "--d-key", "7"),
    (["--d-key", "0"], "--d-key", "0"),
    (["--tokens", "0"], "--tokens", "0"),
    (["--tokens", "-5"], "--tokens", "-5"),
    (["--tokens", "abc"], "--tokens", "abc"),
    (["--tokens", ""], "--tokens", "''"),
    (["--tokens", "1", "--impls", "peer_dist"], "--tokens", "1"),  # BatchNorm needs 2
    (["--dtype", "fp16"], "--dtype", "fp16"),
    (["--modes", "train"], "--modes", "train"),
    (["--impls", ""], "--impls", "''"),
    (["--optimizers", "adam"], "--optimizers", "adam"),
    (["--state-dtype", "fp8"], "--state-dtype", "fp8"),
    (["--device", "tpu"], "--device", "tpu"),
    (["--num-experts", HUGE], "--num-experts", HUGE),  # more memory than the machine has
    (["--dim", HUGE], "--dim", HUGE),
    (["--tokens", HUGE, "--impls", "peer_dist"], "--tokens", HUGE),
])
def test_bad_flags_are_one_line_before_any_work(argv, flag, value, capsys, monkeypatch):
    """Each bad value: status 2 and one line naming the flag and the value, checked once in
    this process before the output check, any row's child or any thread setting."""
    def started(*a, **k):
        raise AssertionError(f"work started for {argv}")

    for name in ("_spawn", "check_outputs", "run_child"):
        monkeypatch.setattr(bench_layer, name, started)
    monkeypatch.setattr(bench_layer.torch, "set_num_threads", started)
    line = refused(capsys, lambda: bench_layer.main(argv))
    assert line.startswith("peer-bench layer: ") and flag in line and value in line, line


def test_tiny_run_gives_roofline_rows():
    cmd = [sys.executable, "-m", "peer_dist.tools.bench_layer", "--num-experts", "1024",
           "--dim", "16", "--heads", "2", "--topk", "4", "--d-key", "8", "--tokens", "32",
           "--impls", "peer_dist", "--modes", "fwd_bwd", "--dtype", "fp32", "--repeats",
           "1", "--warmup", "0", "--threads", "1", "--no-check", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    def strict(name):  # NaN and Infinity are not JSON
        raise ValueError(name)

    rows = [json.loads(line, parse_constant=strict) for line in done.stdout.splitlines()]
    assert [r["dtype"] for r in rows] == ["fp32"] and rows[0]["rel_diff"] is None  # no check
    # by hand: 32 tokens x 8 selections of 1024 rows reach 1024 (1 - (1023/1024)^256) rows;
    # fwd + bwd read U and V rows twice and write du, dv (6 row passes), and move 5 token
    # vectors (x, y; x, dy, dx) (bf16's halving: test_mix_bytes_by_hand, in process)
    rows_hit = 1024 * (1 - (1023 / 1024) ** 256)
    want_bytes = {"fp32": int(6 * rows_hit * 16 * 4 + 5 * 32 * 16 * 4)}
    assert 220 < rows_hit < 230
    # one copy measurement (best of several) is the roofline of every row; no speed threshold:
    # a busy machine copies slowly, and the ratio below is what the table reports
    for r in rows:
        assert r["device"] == "cpu" and r["tokens"] == 32 and r["copy_bytes_per_s"] > 0
        assert r["bytes_moved"] == want_bytes[r["dtype"]]
        want = r["bytes_moved"] / r["copy_bytes_per_s"] / r["seconds"]
        assert r["roofline_fraction"] == pytest.approx(want) and 0 < want < 1
        assert r["tokens_per_s"] == pytest.approx(32 / r["seconds"])


def test_a_failing_row_is_reported_not_fatal(capsys):
    """A child that fails (here: N not a perfect square; on a GPU, out of memory at the largest
    shape) gives a row with its error, so the other rows are still measured."""
    spec = dict(impl="peer_dist", mode="fwd_bwd", tokens=8, dtype="fp32", optimizer="")
    row = bench_layer._spawn(["--num-experts", "1000", "--dim", "16", "--threads", "1"], spec)
    assert "num_experts" in row["error"] and math.isnan(row["tokens_per_s"])
    assert "failed" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals without a GPU")
@pytest.mark.parametrize("only,wheels,message", [
    ("kernels", None, "gpu_check: no CUDA device visible to torch here"),
    ("kernels,foo", None, "gpu_check: GPU_CHECK_ONLY part 'foo' is invalid: allowed are "
                          "kernels, bench, dist, train, scale (comma-separated)"),
    ("kernels", "empty", "gpu_check: GPU_CHECK_WHEELS='{dir}' holds no wheels: allowed is a "
                         "folder of wheels (bash launch/gpu_wheels.sh DIR makes one)"),
])
def test_gpu_check_refuses_in_one_line(only, wheels, message, tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "GPU_CHECK_ONLY": only, "GPU_CHECK_OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable}
    if wheels:
        (tmp_path / wheels).mkdir()
        (tmp_path / wheels / "notes.txt").write_text("not a wheel")
        env["GPU_CHECK_WHEELS"] = str(tmp_path / wheels)
    done = subprocess.run(["bash", str(root / "launch" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(message.format(dir=tmp_path / "empty"))
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("args,message", [
    ([], "gpu_wheels: usage: bash launch/gpu_wheels.sh DIR [PYTHON_VERSION]"),
    (["w", "3.12", "x"], "gpu_wheels: usage: bash launch/gpu_wheels.sh DIR [PYTHON_VERSION]"),
    (["w", "312"], "gpu_wheels: PYTHON_VERSION '312' is invalid: allowed is major.minor"),
])
def test_gpu_wheels_refuses_in_one_line(args, message, tmp_path):
    """The wheel maker's argument errors: one line, exit 2, before any download."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(["bash", str(root / "launch" / "gpu_wheels.sh"), *args], cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_gpu_wheels_names_what_pip_could_not_get(tmp_path):
    """No index reachable (here: a pip that fails): one line naming the packages and the log,
    pip's own messages kept in the log, exit 1."""
    root = Path(__file__).resolve().parents[2]
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n")
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(root / "launch" / "gpu_wheels.sh"), "w", "3.12"],
                          cwd=tmp_path, env={**os.environ, "PYTHON": str(fake)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_wheels: pip could not get deepspeed>=0.16, hjson") and \
        "w/gpu_wheels.log" in last
    assert "No matching distribution" not in done.stderr
    assert "No matching distribution" in (tmp_path / "w" / "gpu_wheels.log").read_text()
