"""The step-time model (tools/cluster_model.py): cluster parsing, its arithmetic on a case
small enough to add by hand, and what it says about layouts at the paper's layer."""

from __future__ import annotations

import json

import pytest
import torch

from peer_dist.errors import UserError
from peer_dist.parallel.cost import LayerShape, predict_by_link
from peer_dist.tools import cluster_model as cm


def test_cluster_forms_and_their_errors(tmp_path) -> None:
    c = cm.parse_cluster("8x8:h100")
    assert (c.nodes, c.gpus_per_node, c.world, c.mem_bytes) == (8, 8, 64, 80 * cm.GIB)
    with pytest.raises(UserError, match=r"--cluster='8x8:v100'.*h100, h200, a100"):
        cm.parse_cluster("8x8:v100")
    good = tmp_path / "lab.yaml"
    good.write_text("nodes: 2\ngpus_per_node: 4\nhbm_bytes_per_s: 1.0e12\n"
                    "intra_bytes_per_s: 1.0e11\ninter_bytes_per_s: 1.0e10\nmem_bytes: 4.0e10\n")
    lab = cm.parse_cluster(str(good))
    assert (lab.world, lab.name, lab.hbm_fraction) == (8, "lab", cm.HBM_FRACTION)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: 2\ngpus: 4\n")
    with pytest.raises(UserError, match=r"unknown keys \['gpus'\].*gpus_per_node"):
        cm.parse_cluster(str(bad))
    lines = good.read_text()
    for text, error in [
            ("[1, 2\n", r"not valid YAML at line 2, column 1"),
            ("- nodes: 2\n", r"unknown keys \['\(not a mapping\)'\]"),
            (lines.replace("nodes: 2", "nodes: two"), r"nodes='two' is invalid: allowed is an int"),
            (lines.replace("nodes: 2", "nodes: 2.5"), r"nodes=2.5 is invalid: allowed is an int"),
            (lines.replace("1.0e12", "-1.0e12"), r"hbm_bytes_per_s=-1000000000000.0 .* > 0"),
            (lines + "hbm_fraction: 1.5\n", r"hbm_fraction=1.5 .* a fraction in \(0, 1\]"),
            (lines + "latency_s: -1\n", r"latency_s=-1.0 .* allowed is a number >= 0")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=error):
            cm.parse_cluster(str(bad))
    # YAML 1.1 reads 4e10 (no dot) as text: taken as the number it spells
    bad.write_text(lines.replace("4.0e10", "4e10"))
    assert cm.parse_cluster(str(bad)).mem_bytes == 4e10
    with pytest.raises(UserError, match=r"'missing.yaml': no such file"):
        cm.parse_cluster("missing.yaml")
    # a world beyond MAX_GPUS is a typo, not a cluster: every EP of it would be priced
    with pytest.raises(UserError, match=r"100000 nodes x 8 GPUs = 800000 GPUs is invalid: "
                                        r"allowed are at most 65536 GPUs"):
        cm.parse_cluster("100000x8:h100")
    bad.write_text(lines.replace("nodes: 2", "nodes: 100000"))
    with pytest.raises(UserError, match=r"100000 nodes x 4 GPUs .* at most 65536 GPUs"):
        cm.parse_cluster(str(bad))
    bad.write_text(lines.replace("nodes: 2", f"nodes: {10 ** 30}"))
    with pytest.raises(UserError, match=rf"nodes={10 ** 30} is invalid: allowed is an integer"):
        cm.parse_cluster(str(bad))
    assert cm.parse_cluster(f"{cm.MAX_GPUS // 8}x8:h100").world == cm.MAX_GPUS


def test_step_is_compute_plus_exposed_communication_by_hand() -> None:
    layer = cm.Layer(num_experts=1024, dim=8, selections=4, tokens=16, elem=4, optimizer=False)
    c = cm.Cluster(nodes=2, gpus_per_node=1, hbm_bytes_per_s=1e9, intra_bytes_per_s=1e6,
                   inter_bytes_per_s=2e5, mem_bytes=1e9, hbm_fraction=1.0, latency_s=0.0)
    row = cm.predict_step(layer, c, ep=2, strategy="dispatch")
    _, inter = predict_by_link(LayerShape(1024, 8, 4, 16, 2, 2, 4, ranks_per_node=1))["dispatch"]
    # tokens x (6 S D e mixed + the messages packed and unpacked) / bandwidth
    compute = 16 * (6 * 4 * 8 * 4 + 2 * inter) / 1e9
    assert row["compute_s"] == pytest.approx(compute)
    assert row["inter_s"] == pytest.approx(16 * inter / 2e5) and row["intra_s"] == 0.0
    assert row["step_s_predicted"] == pytest.approx(compute + 16 * inter / 2e5)
    # four overlap chunks hide what compute covers, never less than one chunk's share
    # (and compute adds the sum of the chunks' row gradients, at the streaming rate)
    hidden = cm.predict_step(layer, c, ep=2, strategy="dispatch", chunks=4)
    assert hidden["compute_s"] == pytest.approx(
        compute + cm.merge_bytes(layer, 2, "dispatch", 4) / 1e9)
    assert hidden["exposed_s"] == pytest.approx(max(row["exposed_s"] - hidden["compute_s"],
                                                    row["exposed_s"] / 4))
    # one rank runs the same chunked path (no messages): the sum is priced there too
    alone, chunked = (cm.predict_step(layer, c, ep=1, strategy=s, chunks=k)["compute_s"]
                      for s, k in (("dispatch", 1), ("dispatch", 4)))
    assert chunked - alone == pytest.approx(cm.merge_bytes(layer, 1, "dispatch", 4) / 1e9)
    assert cm.merge_bytes(layer, 1, "dispatch", 4) > 0
    # a measured grouping rate prices dispatch's one grouping of T*S selections (also with
    # one rank), node_dispatch's two (source and gateway), fetch's none
    sorting = cm.Cluster(**{**c.__dict__, "plan_s_per_selection": 1e-6})
    for strategy, ep, n in (("dispatch", 2, 1), ("dispatch", 1, 1), ("node_dispatch", 2, 2),
                            ("fetch", 2, 0)):
        plain, priced = (cm.predict_step(layer, k, ep, strategy)["compute_s"]
                         for k in (c, sorting))
        assert priced - plain == pytest.approx(n * 16 * 4 * 1e-6), strategy
    # slower cores (CPU ranks sharing them) scale compute only
    shared = cm.predict_step(layer, cm.Cluster(**{**c.__dict__, "cores_per_rank": 0.5}), 2,
                             "dispatch")
    assert shared["compute_s"] == pytest.approx(2 * compute)


def test_paper_layer_on_8x8_prefers_node_dispatch_when_ep_spans_nodes() -> None:
    rows = cm.layouts(cm.Layer(), cm.parse_cluster("8x8:h100"))
    assert rows == sorted(rows, key=lambda r: (not r["fits"],
                                               -r["tokens_per_s_per_gpu_predicted"]))
    by = {(r["ep"], r["strategy"]): r for r in rows}
    assert by[(64, "node_dispatch")]["inter_s"] < by[(64, "dispatch")]["inter_s"] / 6
    assert by[(64, "node_dispatch")]["step_s_predicted"] < by[(64, "dispatch")][
        "step_s_predicted"]
    assert (8, "node_dispatch") not in by  # EP inside one node: no second hop to price
    assert {"ep", "dp", "strategy", "step_s_predicted", "tokens_per_s_per_gpu_predicted",
            "peak_bytes_per_rank_predicted"} <= set(rows[0])


def test_plan_cluster_ranks_layouts_that_fit_by_tokens_per_gpu(capsys) -> None:
    import json

    from peer_dist.tools import scale

    scale.main(["plan", "--cluster", "2x8:h100", "--json", "--top", "50"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["peak_bytes_per_rank_predicted"] <= 80 * cm.GIB for r in rows)
    speed = [r["tokens_per_s_per_gpu_predicted"] for r in rows]
    assert speed == sorted(speed, reverse=True)
    assert {r["ep"] * r["dp"] for r in rows} == {16}
    assert {"node_dispatch", "dispatch"} <= {r["strategy"] for r in rows}
    with pytest.raises(SystemExit, match=r"--cluster='2x8:tpu'.*h100, h200, a100"):
        scale.main(["plan", "--cluster", "2x8:tpu"])


def test_sync_and_fresh_buffer_terms_by_hand() -> None:
    # N = 4 rows, one token of S = 2 selections: 4 (1 - (3/4)^2) = 1.75 distinct rows
    tiny = cm.Layer(num_experts=4, dim=8, selections=2, tokens=1, elem=4, optimizer=False)
    assert cm.distinct_rows(tiny) == pytest.approx(1.75)
    row = 2 * 8 * 4  # a U row and a V row, float32
    # rows in order (local, dispatch in one chunk): nothing, on any number of ranks (the 1/W
    # is folded into the mix's backward)
    assert cm.sync_bytes(tiny, 1, "local") == 0.0
    # coalesce reads what arrived (fetch: 1.75 served rows) and writes the 1.75 touched rows
    assert cm.sync_bytes(tiny, 1, "fetch") == pytest.approx((1.75 + 1.75) * row)
    assert cm.sync_bytes(tiny, 1, "replicated") == 0.0
    # chunked dispatch sums its chunks' rows in the backward, in order: no sync pass; the sum
    # zeroes the 1.75 touched rows, reads and adds each chunk's (half a token: 4 (1 - 3/4) =
    # 1 row each, read once and added: 3 passes)
    assert cm.sync_bytes(tiny, 1, "dispatch", chunks=2) == 0.0
    assert cm.merge_bytes(tiny, 1, "dispatch", chunks=2) == pytest.approx((1.75 + 3 * 2) * row)
    assert cm.merge_bytes(tiny, 1, "dispatch") == cm.merge_bytes(tiny, 1, "fetch", 2) == 0.0
    # zeroed: fetch's row gradients, both whole tables' gradients (replicated); gathered:
    # fetch's served rows
    assert cm.fresh_bytes(tiny, "fetch") == pytest.approx(1.75 * row)
    assert cm.fresh_bytes(tiny, "replicated") == pytest.approx(4 * row)
    assert cm.fresh_bytes(tiny, "dispatch") == 0.0
    assert cm.gathered_bytes(tiny, "fetch") == pytest.approx(1.75 * row)
    assert cm.gathered_bytes(tiny, "replicated") == cm.gathered_bytes(tiny, "dispatch") == 0.0


def test_measured_rates_price_fetch_replicated_and_the_sync() -> None:
    layer = cm.Layer(num_experts=1024, dim=8, selections=4, tokens=16, elem=4, optimizer=False)
    c = cm.Cluster(nodes=2, gpus_per_node=1, hbm_bytes_per_s=1e9, intra_bytes_per_s=1e6,
                   inter_bytes_per_s=2e5, mem_bytes=1e9, hbm_fraction=1.0, latency_s=0.0,
                   stream_bytes_per_s=4e8, fresh_bytes_per_s=1e6, sync_bytes_per_s=2e6,
                   allreduce_bytes_per_s=5e5, gather_bytes_per_s=5e5)
    r = 1024 * (1 - (1 - 1 / 1024) ** 64)  # distinct rows of 16 x 4 selections
    touched = 512 * (1 - (1 - 1 / 1024) ** 128)  # a shard's rows two members touch
    row = 2 * 8 * 4
    mix = 16 * 6 * 4 * 8 * 4 / 1e9
    fetch = cm.predict_step(layer, c, ep=2, strategy="fetch")
    # no packing term for fetch: its gather (R rows) and coalesce (sync) replace it; its R
    # row gradients are zeroed
    assert fetch["compute_s"] == pytest.approx(mix + r * row / 5e5 + r * row / 1e6
                                               + (r + touched) * row / 2e6)
    disp = cm.predict_step(layer, c, ep=2, strategy="dispatch")
    _, inter = predict_by_link(LayerShape(1024, 8, 4, 16, 2, 2, 4, ranks_per_node=1))["dispatch"]
    # dispatch's row gradients arrive in order, the 1/W already in them: no sync pass
    assert disp["compute_s"] == pytest.approx(mix + 16 * 2 * inter / 1e9)
    # replicated: dense gradients zeroed (fresh); the in-place all-reduce at its own measured
    # rate (its reads and sums in it: no packing, no stream term)
    rep = cm.predict_step(layer, c, ep=2, strategy="replicated")
    assert rep["compute_s"] == pytest.approx(mix + 1024 * row / 1e6)
    ring = 2.0 * (2 - 1) / 2 * 2 * 1024 * 8 * 4  # bytes one rank sends
    assert rep["intra_s"] + rep["inter_s"] == pytest.approx(ring / 5e5)
    # without a measured all-reduce rate (a GPU preset): the wire at the links' rate, the
    # gradients read at the stream rate
    wire = cm.predict_step(layer, cm.Cluster(**{**c.__dict__, "allreduce_bytes_per_s": 0.0}),
                           ep=2, strategy="replicated")
    assert wire["compute_s"] == pytest.approx(mix + 1024 * row / 1e6 + 1024 * row / 4e8)
    # (two nodes of one GPU: every hop of the ring crosses)
    assert (wire["intra_s"], wire["inter_s"]) == pytest.approx((0.0, ring / 2e5))
    # a world of one: fetch still gathers (its sends are no-ops), no collective latency
    alone = cm.predict_step(layer, cm.Cluster(**{**c.__dict__, "nodes": 1, "latency_s": 1.0}),
                            ep=1, strategy="fetch")
    one = 1024 * (1 - (1 - 1 / 1024) ** 64)
    assert alone["step_s_predicted"] == pytest.approx(mix + r * row / 5e5 + r * row / 1e6
                                                      + (r + one) * row / 2e6)
    # without a gather rate the gathered rows are priced as zeroed ones
    plain = cm.predict_step(layer, cm.Cluster(**{**c.__dict__, "gather_bytes_per_s": 0.0}),
                            ep=2, strategy="fetch")
    assert plain["compute_s"] == pytest.approx(fetch["compute_s"] - r * row / 5e5
                                               + r * row / 1e6)
    # fetch's own sync rate, where measured, prices fetch's sync and nothing else's
    own = cm.Cluster(**{**c.__dict__, "sync_fetch_bytes_per_s": 4e6})
    assert cm.predict_step(layer, own, ep=2, strategy="fetch")["compute_s"] == pytest.approx(
        fetch["compute_s"] - (r + touched) * row / 2e6 + (r + touched) * row / 4e6)
    assert cm.predict_step(layer, own, ep=2, strategy="dispatch")["compute_s"] == (
        pytest.approx(disp["compute_s"]))


def test_fetch_probe_serves_each_members_share_of_its_distinct_rows() -> None:
    """probe_mix's fetch phases run at the model's shape: from a shard of 1,000 rows, each of
    EP = 4 members asks for R / 4 rows, ascending within its block (R: the model's distinct
    rows of 64 tokens x 8 selections of N = 4,000)."""
    import argparse

    from peer_dist.tools.bench_dist import served_rows

    args = argparse.Namespace(num_experts=4000, dim=8, heads=2, topk=4, tokens=64)
    r = 4000 * (1 - (1 - 1 / 4000) ** (64 * 8))
    served = served_rows(args, 1000, 4, torch.Generator().manual_seed(0))
    each = round(r / 4)
    assert served.numel() == 4 * each and 0 <= int(served.min()) and int(served.max()) < 1000
    for block in served.view(4, each):
        assert torch.equal(block, block.sort().values) and block.unique().numel() == each


def test_rounds_take_the_median_run_and_the_median_ratio() -> None:
    """peer-bench dist --rounds: per row the round with the median step, every round's step
    kept; against W = 1 the median of each round's own ratio (not a ratio of medians), with
    its range; invalid counts refused in one line."""
    from peer_dist.tools import bench_dist as bd

    def row(w, step, comm):
        return dict(source="measured", strategy="dispatch", world_size=w, nodes=1, ep=w,
                    overlap_chunks=1, step_s=step, step_s_predicted=0.0, comm_exposed_s=comm)

    # W = 1 / W = 2 per round: ratios 1.5, 1.0, 1.1 (median 1.1, from round 3)
    rounds = [[row(1, 0.10, 0), row(2, 0.15, 1)], [row(1, 0.20, 0), row(2, 0.20, 2)],
              [row(1, 0.10, 0), row(2, 0.11, 3)]]
    rows = bd.median_rows(rounds)
    one, two = sorted(rows, key=lambda r: r["world_size"])
    assert one["step_s"] == 0.10 and one["step_s_rounds"] == [0.10, 0.20, 0.10]
    assert two["step_s"] == 0.15 and two["comm_exposed_s"] == 1  # round 1's: its median step
    assert two["step_ratio_w1_rounds"] == pytest.approx([1.5, 1.0, 1.1])
    assert "step_ratio_w1_rounds" not in one
    line = next(x for x in bd.step_ratios(rows) if "W=2" in x)
    assert "/ W=1 = 1.100x (median of 3 rounds, 1.000-1.500)" in line, line
    assert bd.median_rows(rounds[:1]) == rounds[0]  # one round: the rows as measured
    with pytest.raises(SystemExit):
        bd.parse(["--rounds", "0"])


def test_mix_probe_runs_at_the_owners_bag_shape(monkeypatch) -> None:
    """Dispatch's owner mixes one bag per (token, owner) pair: probe_mix times the mix at that
    shape (T*m bags, the T*S selections split evenly, m = the cost model's owners a token
    touches, the 1/EP table scale), and fetch's at one bag per token."""
    import argparse

    from peer_dist import ops
    from peer_dist.tools import bench_dist as bd

    args = argparse.Namespace(num_experts=4000, dim=8, heads=2, topk=8, tokens=32)
    assert bd.mix_bags_per_token(args, 1, "dispatch") == 1.0
    assert bd.mix_bags_per_token(args, 4, "fetch") == 1.0
    m = bd.mix_bags_per_token(args, 2, "dispatch")
    assert m == pytest.approx(2 - 2 * 0.5 ** 16) and bd.mix_bags_per_token(
        args, 2, "node_dispatch") == m
    seen = []
    real = ops.ragged_mix

    def spy(x, rows, bag, gates, u, v, act, table_scale=1.0):
        seen.append((x.shape[0], torch.bincount(bag).tolist(), table_scale, int(rows.max())))
        return real(x, rows, bag, gates, u, v, act, table_scale=table_scale)

    monkeypatch.setattr(ops, "ragged_mix", spy)
    got = bd.probe_mix(args, 2000, ep=2, reps=1, bags_per_token=m)
    assert got["mix_s_per_token"] > 0 and len(seen) == 2  # reps + 1 steps
    bags, sizes, scale, top = seen[0]
    assert bags == 64 and sizes == [8] * 64 and scale == 0.5 and top < 2000
    seen.clear()
    bd.probe_mix(args, 2000, ep=2, reps=1)  # one bag per token: the layer's own mix
    assert seen == [] or all(b == 32 for b, *_ in seen)
    seen.clear()  # overlapped: one mix per chunk of bags, as OverlappedDispatch runs them
    got = bd.probe_mix(args, 2000, ep=2, reps=1, bags_per_token=m, chunks=2)
    assert [(b, s) for b, s, *_ in seen] == [(32, [8] * 32)] * 4 and got["sync_s"] >= 0


def test_step_ratios_show_the_mix_probe_against_one_rank() -> None:
    """Beside W = 2's step against W = 1's, the mix probe's seconds (the same work per rank,
    every rank running) against W = 1's: what sharing the machine costs before any message."""
    from peer_dist.tools import bench_dist as bd

    def row(w, step, mix):
        return dict(source="measured", strategy="dispatch", world_size=w, nodes=1, ep=w,
                    overlap_chunks=1, step_s=step, step_s_predicted=step / 2,
                    model_constants={"mix_s_per_token": mix})

    lines = bd.step_ratios([row(1, 0.10, 1e-4), row(2, 0.13, 1.25e-4)])
    assert lines[1] == ("step dispatch W=2 M=1: / W=1 = 1.300x, mix probe / W=1's = 1.250x, "
                        "measured / model = 2.000"), lines
    assert lines[0] == "step dispatch W=1 M=1: measured / model = 2.000"


def test_hbm_fraction_from_a_bench_run(tmp_path, capsys) -> None:
    """--from-bench: the mix kernels' achieved HBM fraction from peer-bench dist's rows (the
    model's mix bytes per token over the probe's seconds per token, median over the rows),
    other lines skipped; a file without such rows, or none, is one line."""
    row = dict(source="measured", num_experts=4096, dim=64, heads=2, topk=4,
               tokens_per_rank=128, model_constants={"mix_s_per_token": 1e-6})
    per_token = 6 * 8 * 64 * 4  # mix_bytes: 6 S D e, fp32
    runs = tmp_path / "bench.log"
    runs.write_text("peer-bench dist: 1 rank(s) on 1 node(s)...\n" + json.dumps(row) + "\n"
                    + json.dumps({**row, "model_constants": {"mix_s_per_token": 3e-6}}) + "\n"
                    + json.dumps({**row, "model_constants": {"mix_s_per_token": 2e-6}}) + "\n"
                    + json.dumps({**row, "source": "model"}) + "\n7\n")
    c = cm.parse_cluster("1x8:h100")
    assert cm.measured_fraction(str(runs), c) == pytest.approx(per_token / 2e-6 / 3.35e12)
    cm.main(["--gpus", "1", "--cluster", "h100", "--from-bench", str(runs)])
    out = capsys.readouterr().out
    assert f"x {per_token / 2e-6 / 3.35e12:.1%} (measured: {runs})" in out
    empty = tmp_path / "empty.log"
    empty.write_text("no rows\n")
    infinite = tmp_path / "inf.log"  # a probe time of Infinity, NaN or 0 is no rate
    infinite.write_text("\n".join(json.dumps({**row, "model_constants": {
        "mix_s_per_token": t}}) for t in (float("inf"), float("nan"), 0.0)) + "\n")
    for bad in (empty, infinite, tmp_path / "missing.log", tmp_path):
        with pytest.raises(SystemExit) as e:
            cm.main(["--cluster", "h100", "--from-bench", str(bad)])
        assert str(e.value).startswith(f"cluster_model: --from-bench={bad}: ")


def test_mix_constant_is_the_slowest_rank_in_each_phase(monkeypatch) -> None:
    """The model's mix seconds: per rep the slowest rank's forward plus the slowest rank's
    backward (collectives sit between them), the median over reps; not the slowest rank's
    median whole mix (which misses that each phase waits for its own slowest rank)."""
    import argparse
    import types

    from peer_dist.tools import bench_dist as bd

    ranks = [  # (forward, backward) seconds of three reps on two ranks
        [[1.0, 3.0], [1.0, 3.0], [1.0, 3.0]],
        [[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]],
    ]
    mine = {"mix_s_per_token": 0.0, "sync_s": 0.0, "gather_s": 1.0, "sync_fetch_s": 0.0,
            "plan_s_per_selection": 0.0, "served_rows": 1}
    monkeypatch.setattr(bd, "probe_mix", lambda *a, **k: {**mine, "mix_phases": ranks[0]})
    other = [t for rep in ranks[1] for t in rep]  # rank 1's phases, as all_reduce sees them

    def reduce(values, device, op="max"):  # the max over the two ranks of the phases' list
        return [max(v, w) for v, w in zip(values, other, strict=True)] if len(values) == 6 \
            else list(values)

    monkeypatch.setattr(bd, "_reduce", reduce)
    monkeypatch.setattr("torch.distributed.barrier", lambda *a, **k: None)
    args = argparse.Namespace(num_experts=64, dim=4, heads=1, topk=2, tokens=10,
                              overlap_chunks=1)
    topo = types.SimpleNamespace(ep=1, device=torch.device("cpu"))
    out = bd.probe_mix_world(args, topo, "dispatch")
    # (max(1, 2) + max(3, 1)) / 10 tokens = 0.5; the slowest whole mix would say 4 / 10
    assert out["mix_s_per_token"] == pytest.approx(0.5)


def test_interleaved_one_rank_steps_give_their_own_ratio() -> None:
    """--interleave: each W > 1 row carries the one-rank steps measured between the world's,
    rank 0's alone and the slowest of every rank's at once; their ratios are printed beside
    the ratio to the W = 1 launch, of several rounds the median of each round's own ratio with
    its range."""
    from peer_dist.tools import bench_dist as bd

    def row(w, step, solo=None, solo_all=None):
        r = dict(source="measured", strategy="dispatch", world_size=w, nodes=1, ep=w,
                 overlap_chunks=1, step_s=step, step_s_predicted=0.0)
        return {**r, "solo_step_s": solo, "solo_all_step_s": solo_all} if solo else r

    rounds = [[row(1, 0.10), row(2, 0.15, 0.12, 0.15)], [row(1, 0.20), row(2, 0.20, 0.19, 0.16)],
              [row(1, 0.10), row(2, 0.11, 0.10, 0.11)]]
    rows = bd.median_rows(rounds)
    two = next(r for r in rows if r["world_size"] == 2)
    assert two["step_ratio_solo_rounds"] == pytest.approx([1.25, 0.20 / 0.19, 1.1])
    assert two["step_ratio_solo_all_rounds"] == pytest.approx([1.0, 1.25, 1.0])
    assert bd.step_ratios(rows)[1] == (
        "step dispatch W=2 M=1: / W=1 = 1.100x (median of 3 rounds, 1.000-1.500), "
        "/ W=1 interleaved = 1.100x (median of 3 rounds, 1.053-1.250), "
        "/ W=1 on every rank at once = 1.000x (median of 3 rounds, 1.000-1.250)")
    assert bd.step_ratios(rounds[0])[1].endswith(
        "/ W=1 = 1.500x, / W=1 interleaved = 1.250x, / W=1 on every rank at once = 1.000x")
    with pytest.raises(SystemExit):
        bd.parse(["--interleave", "--rounds", "0"])


def test_a_signal_stops_the_agents_and_is_noted() -> None:
    """peer-bench dist's launch: Ctrl-C or SIGTERM while the torchrun agents run stops them
    and is noted (one line to the user, not each rank's traceback); the handlers come back."""
    import os
    import signal
    import subprocess

    from peer_dist.tools import bench_dist as bd

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM):
        agent = subprocess.Popen(["sleep", "30"])
        with bd._stop_on_signal([agent]) as stopped:
            os.kill(os.getpid(), sig)
            assert agent.wait(timeout=10) == -signal.SIGTERM
        assert stopped == [sig.name]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
