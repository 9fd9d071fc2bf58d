"""peer-scale predict's plot: against the axis that varies (EP when N is one value), one line
per other setting (not one dot per world size that follows EP), and the device's capacity."""

from __future__ import annotations

from peer_dist.tools import scale


def rows(eps, ns=(1 << 20,), zero=(0,)):
    return [dict(num_experts=n, dim=1024, layers=1, ep=e, world_size=e, dtype="fp32",
                 table_dtype="fp32", table_optimizer="lazy_adam", zero_stage=z,
                 strategy="dispatch", tokens_per_rank=4096, heads=8, topk=16, device="cuda",
                 total_bytes_per_rank_predicted=(1 << 36) // e + z)
            for n in ns for e in eps for z in zero]


def test_axis_is_n_when_it_varies_else_ep():
    assert scale.plot_axis(rows([1, 2], ns=(1024, 4096))) == "num_experts"
    assert scale.plot_axis(rows([1, 2, 4, 8])) == "ep"


def test_series_are_the_other_settings_not_what_follows_the_axis():
    groups = scale.group_rows(rows([1, 2, 4, 8], zero=(0, 3)), "ep")
    assert sorted(groups) == ["z=0", "z=3"]  # world_size follows EP: not a series
    assert [r["ep"] for r in groups["z=0"]] == [1, 2, 4, 8]


def test_predict_plot_has_the_capacity_line(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(scale, "line_chart", lambda path, series, title, xlabel, ylabel:
                        drawn.update(series=series, xlabel=xlabel))
    monkeypatch.setattr(scale, "write_tensorboard", lambda *a: None)
    scale.write_outputs(rows([1, 2, 4]), list(scale.SETUP_KEYS), tmp_path, "predict",
                        [("total_bytes_per_rank_predicted", "line")], 80 * scale.GIB)
    assert drawn["xlabel"].startswith("EP")
    line, cap = drawn["series"]
    assert line.xs == [1, 2, 4] and cap.label == "device capacity 80 GiB"
    assert cap.ys == [80 * scale.GIB] * 2
