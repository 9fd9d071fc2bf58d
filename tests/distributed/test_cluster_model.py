"""The step-time model (tools/cluster_model.py): cluster parsing, its arithmetic on a case
small enough to add by hand, and what it says about layouts at the paper's layer."""

from __future__ import annotations

import pytest

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
    hidden = cm.predict_step(layer, c, ep=2, strategy="dispatch", chunks=4)
    assert hidden["exposed_s"] == pytest.approx(max(row["exposed_s"] - compute,
                                                    row["exposed_s"] / 4))
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
