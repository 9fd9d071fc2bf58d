"""peer-bench router on a tiny router: its two rows, its table and its refusals."""

from __future__ import annotations

import json

import pytest

from peer_dist.tools import bench

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


@pytest.mark.parametrize("args, words", [
    (["--num-experts", "1000"], "num_experts"),
    (["--tokens", "1"], "--tokens=1 --repeats=5: allowed are tokens >= 2"),
])
def test_router_refusals_are_one_line(capsys, args, words):
    with pytest.raises(SystemExit) as e:
        bench.main(["router", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["rooter"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: peer-bench {") and len(err.strip().splitlines()) == 1
    commands = err.split("{")[1].split("}")[0].split(",")
    assert {"layer", "dist", "router"} <= set(commands) and commands == list(bench.COMMANDS)
