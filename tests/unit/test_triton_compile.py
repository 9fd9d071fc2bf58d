"""The Triton kernels compiled for sm_80 and sm_90 without a GPU (peer-bench kernels), with
the launch parameters triton_mix.plan picks: no spills, 128-bit table-row loads where a row's
bytes allow them, each tile's U and V row loads issued before the first barrier of its loop,
and enough bytes in flight at the paper's shape. The full grid of d and
dtypes is `peer-bench kernels`; here a subset that covers every kernel, both targets, both
dtypes, a single column part and several, d not a multiple of 16, and the narrow-load fallback.
Compiled once per session (two processes), then Triton's cache.
"""

from __future__ import annotations

import json

import pytest
import torch

from peer_dist.ops import triton_mix

pytestmark = pytest.mark.skipif(not triton_mix.installed(), reason="triton not installed")

# (d, dtype, archs): tables and activations in one dtype
SHAPES = [(1024, "bf16", (80, 90)), (768, "fp32", (80,)), (8192, "fp32", (90,)),
          (1004, "bf16", (80,))]


@pytest.fixture(scope="module")
def rows():
    from peer_dist.tools import bench_kernels as bk

    jobs = [(spec, arch) for d, name, archs in SHAPES
            for spec in bk.specs(d, bk.DTYPES[name], bk.DTYPES[name]) for arch in archs]
    return bk.measure_all(jobs, 600.0, workers=2)


def _row_bytes(row) -> int:
    return row["d"] * (4 if row["table_dtype"] == "fp32" else 2)


def test_every_kernel_compiles_for_both_targets(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"mix_fwd", "mix_bwd_bags", "row_grads"} <= kernels
    assert {(r["kernel"], r["arch"]) for r in rows} >= {(k, a) for k in kernels
                                                        for a in ("sm_80", "sm_90")}
    for r in rows:
        assert r["registers"] > 0 and r["programs_per_sm"] >= 1, r


def test_no_spills_and_every_row_load_of_a_tile_before_its_first_barrier(rows):
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert r["loads_after_barrier"] == 0, r


def test_table_rows_load_128_bits_where_row_bytes_allow(rows):
    for r in rows:
        want = 128 if _row_bytes(r) % 16 == 0 else 64  # d = 1004 bf16: 8-byte fallback
        assert r["row_load_bits"] == want, r


def test_bytes_in_flight_at_the_paper_shape(rows):
    """d = 1024 bf16 on sm_90: the mix kernels keep at least twice what H200's HBM needs per
    SM in flight, and the forward issues a whole tile's U and V rows (W rows of each) before
    its first wait."""
    at = {r["kernel"]: r for r in rows if r["d"] == 1024 and r["arch"] == "sm_90"}
    for name in ("mix_fwd", "mix_bwd_bags", "row_grads"):
        r = at[name]
        assert r["inflight_bytes_per_sm"] >= 2 * r["inflight_needed_bytes_per_sm"], r
    fwd = at["mix_fwd"]
    w = triton_mix.plan(1024, torch.bfloat16).W
    assert fwd["inflight_bytes"] >= 2 * w * _row_bytes(fwd)


def test_little_law_and_occupancy():
    from peer_dist.tools import bench_kernels as bk

    assert bk.needed_per_sm("H200", 600) == int(4.8e12 * 600e-9 / 132)  # 21,818 B
    assert bk.occupancy(90, 128, 4096, 8) == 2  # 128 regs x 256 threads = half the file
    assert bk.occupancy(90, 129, 0, 8) == 1  # 136 allocated: no longer two
    assert bk.occupancy(80, 32, 100 * 1024, 4) == 1  # shared memory bound (164 KiB)
    assert bk.occupancy(90, 16, 0, 1) == 32  # the block limit


def test_analysis_stops_at_the_first_wait():
    """Bits issued per lane before a barrier or before a loaded register is read; barriers
    inside a backward branch's span are counted."""
    from peer_dist.tools import bench_kernels as bk

    row = "LDG.E.128.STRONG.GPU"
    insns = [(0x10, "LDG.E.64", "R2, desc[UR4][R4.64]"),  # an index: not a row
             (0x20, row, "R8, desc[UR4][R2.64]"),
             (0x30, row, "R12, desc[UR4][R2.64+0x200]"),
             (0x40, "FMUL", "R20, R9, R30"),  # reads R9, loaded at 0x20: the first wait
             (0x50, row, "R16, desc[UR4][R2.64+0x400]"),
             (0x60, "BAR.SYNC.DEFER_BLOCKING", "0x0"),
             (0x70, "BRA", "0x20")]
    got = bk.analyse(insns)
    assert got == dict(row_load_bits=128, row_loads=3, inflight_lane_bits=256,
                       loop_barriers=1, loads_after_barrier=0)
    late = insns[:4] + [insns[5], insns[4], insns[6]]  # a row load waits for the barrier
    assert bk.analyse(late)["loads_after_barrier"] == 1
    insns[3] = (0x40, "FMUL", "R20, R40, R30")  # no use: the barrier is the first wait
    assert bk.analyse(insns)["inflight_lane_bits"] == 384
    assert bk.analyse([(0, "LDG.E.U16.STRONG.GPU", "R1, desc[UR4][R2.64]")])[
        "row_load_bits"] == 16


def test_cli_json_and_refusals(capsys):
    from peer_dist.tools import bench_kernels as bk

    bk.main(["--dims", "256", "--dtypes", "bf16", "--archs", "90", "--jobs", "1", "--json"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["kernel"] for r in out} >= {"mix_fwd", "mix_bwd_bags", "row_grads"}
    need = {"kernel", "arch", "d", "table_dtype", "act_dtype", "registers", "spill_bytes",
            "shared_bytes", "programs_per_sm", "row_load_bits", "inflight_bytes_per_sm",
            "inflight_needed_bytes_per_sm"}
    assert all(need <= set(r) and r["arch"] == "sm_90" and r["d"] == 256 for r in out)
    for bad, name in ((["--archs", "70"], "--archs"), (["--dims", "0"], "--dims"),
                      (["--dtypes", "fp8"], "--dtypes")):
        with pytest.raises(SystemExit) as e:
            bk.main(bad)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert name in err and "allowed" in err


def test_compiler_workers_leave_ctrl_c_to_the_tool():
    """A Ctrl-C reaches the whole process group: workers that took it while importing torch
    printed their tracebacks before the tool's one line (2 of 3 tries)."""
    import signal

    from peer_dist.tools import bench_kernels as bk

    before = signal.getsignal(signal.SIGINT)
    with bk.compiler_pool(1) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is before  # this process still takes it
