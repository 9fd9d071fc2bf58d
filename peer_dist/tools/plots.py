"""The scaling studies' plots (matplotlib, headless).

    Series(label, xs, ys, style, color)     style: "line" (with dots), "points", "cross"
    line_chart(path, series, title, xlabel, ylabel)          log-log bytes against N
    predicted_vs_measured(path, predicted, measured, labels, title, band)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_MARKERS = {"line": dict(marker="o", linestyle="-"), "points": dict(marker="s", linestyle=""),
            "cross": dict(marker="x", linestyle="", markersize=8)}


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    style: str = "line"
    color: int = 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_chart(path: str | Path, series: list[Series], title: str, xlabel: str,
               ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for s in series:
        if s.xs:
            ax.plot(s.xs, s.ys, label=s.label, color=f"C{s.color % 10}", **_MARKERS[s.style])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if any(s.xs for s in series):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def predicted_vs_measured(path: str | Path, predicted: list[float], measured: list[float],
                          labels: list[str], title: str, band: float = 0.10) -> None:
    """Predicted against measured bytes, log-log, with y = x and the +-band lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6), dpi=110)
    lo, hi = min(predicted + measured) * 0.8, max(predicted + measured) * 1.25
    ax.plot([lo, hi], [lo, hi], color="k", linewidth=1, label="predicted = measured")
    for f in (1 - band, 1 + band):
        ax.plot([lo, hi], [lo * f, hi * f], color="grey", linestyle="--", linewidth=0.8)
    groups = sorted(set(labels))
    for i, g in enumerate(groups):
        pts = [(m, p) for m, p, lab in zip(measured, predicted, labels, strict=True) if lab == g]
        ax.scatter([m for m, _ in pts], [p for _, p in pts], label=g, color=f"C{i % 10}", s=18)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(title=title, xlabel="measured peak bytes per rank",
           ylabel="predicted peak bytes per rank", xlim=(lo, hi), ylim=(lo, hi))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title=f"dashed: +-{100 * band:.0f}%")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
