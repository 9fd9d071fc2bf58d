"""peer-bench router on a tiny router: its two rows, its table and its refusals."""

from __future__ import annotations

import json

import pytest
from oneline import refused

from peer_dist.tools import bench, bench_router

TINY = ["--num-experts", "4096", "--dim", "32", "--heads", "2", "--topk", "8", "--d-key", "16",
        "--tokens", "256", "--repeats", "1"]


def test_router_rows(capsys):
    bench.main(["router", *TINY, "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["router_dtype"] for r in rows] == ["fp32", "activations"]
    fp32, low = rows
    for r in rows:
        assert (r["tokens"], r["num_experts"], r["heads"], r["topk"]) == (256, 4096, 2, 8)
        assert r["fwd_bwd_ms"] > 0
    # router_dtype=fp32 is the fp32 router on the same rounded weights: the same experts,
    # gates within fp32 rounding; all-bf16 scores pick some other experts
    assert fp32["differ_frac"] == 0.0 and fp32["gate_err"] < 1e-5
    assert 0 < low["differ_frac"] < 0.5 and low["gate_err"] > fp32["gate_err"]


def test_router_table(capsys):
    bench.main(["router", *TINY])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["router_dtype", "tokens", "N"]
    assert out[1].split()[:3] == ["fp32", "256", "4096"]
    assert out[2].split()[0] == "activations"
    assert out[3].startswith("router_dtype=fp32 / activations time = ")


HUGE = str(2 ** 40)  # passes the integer bound; more memory than any machine has


@pytest.mark.parametrize("args, flag, value", [
    (["--num-experts", "1000"], "--num-experts", "1000"),
    (["--num-experts", "0"], "--num-experts", "0"),
    (["--num-experts", HUGE], "--num-experts", HUGE),
    (["--tokens", "1"], "--tokens", "1"),  # the query BatchNorm needs 2
    (["--tokens", "0"], "--tokens", "0"),
    (["--tokens", "abc"], "--tokens", "abc"),
    (["--tokens", HUGE], "--tokens", HUGE),
    (["--repeats", "0"], "--repeats", "0"),
    (["--device", "tpu"], "--device", "tpu"),
    (["--device", ""], "--device", "''"),
    (["--dim", "-1"], "--dim", "-1"),
    (["--dim", "0"], "--dim", "0"),
    (["--dim", str(10 ** 30)], "--dim", str(10 ** 30)),
    (["--heads", "0"], "--heads", "0"),
    (["--topk", "0"], "--topk", "0"),
    (["--topk", "2000"], "--topk", "2000"),  # > sqrt(1024^2)
    (["--d-key", "3"], "--d-key", "3"),
    (["--d-key", "0"], "--d-key", "0"),
])
def test_router_refusals_are_one_line(capsys, monkeypatch, args, flag, value):
    def started(*a, **k):
        raise AssertionError(f"work started for {args}")

    monkeypatch.setattr(bench_router, "run", started)
    line = refused(capsys, lambda: bench.main(["router", *args]))
    assert line.startswith("peer-bench router: ") and flag in line and value in line, line


@pytest.mark.parametrize("argv", [["rooter"], ["--threads"], [""]])
def test_unknown_command_is_refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"peer-bench: command {argv[0]!r} is invalid: allowed are layer, dist, "
                     "router, kernels, checkpoint (see peer-bench --help)"]


def test_no_command_is_the_usage_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: peer-bench {") and len(err.strip().splitlines()) == 1
    commands = err.split("{")[1].split("}")[0].split(",")
    assert commands == list(bench.COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands_and_exits_0(capsys, flag):
    try:
        bench.main([flag])
    except SystemExit as e:  # argparse's --help exits 0 too: either is fine
        assert e.code in (0, None)
    out, err = capsys.readouterr()
    assert out.startswith("usage: peer-bench {") and err == ""
    for command in bench.COMMANDS:
        assert f"peer-bench {command} ..." in out
