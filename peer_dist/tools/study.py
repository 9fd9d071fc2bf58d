"""peer-study: the paper's quality claims at small scale, on this machine.

    peer-study isoflop                    # PEER against dense, MoE and PKM at equal compute
    peer-study isoflop --budgets 1e12,2e12 --sizes 64,96,128 --seeds 0,1 --json
    peer-study experts                    # Table 2: expert usage and unevenness, BN on and off

isoflop: for each FLOP budget, each kind and each model width, a model is trained for
budget / (training FLOPs per token) tokens (peer_dist/model/flops.py) on the local default
corpus (this Python's library, byte tokens) and evaluated on the held-out split. Every kind
gets the same data order, tokenizer, optimizer (AdamW on dense weights, lazy Adam on PEER's
tables, both at one learning rate), warmup + cosine schedule and gradient clipping; no
per-kind tuning. The sparse layer replaces the middle block's FFW (as in the paper); MoE is
expert-choice routing (the paper's baseline), PKM uses PEER's keys with one value table.
Writes OUT/isoflop.md, OUT/isoflop.csv and OUT/isoflop.png (validation perplexity against
parameters, per kind and budget); --json prints one object per trained model.

experts: PEER trained with and without query BatchNorm for several N, then expert usage
(share of experts any held-out token selected) and unevenness (KL of the gate mass from
uniform) on the held-out split, as the paper's Table 2.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peer_dist.config import DataConfig, ModelConfig, MoEConfig, PEERConfig

KINDS = ("dense", "moe", "pkm", "peer")


@dataclass
class Recipe:
    """What every kind shares."""

    seq_len: int = 64
    batch: int = 16
    lr: float = 3e-3
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_batches: int = 16
    layers: int = 4
    heads: int = 4


def model_config(kind: str, dim: int, r: Recipe, num_experts: int = 128 ** 2,
                 query_batchnorm: bool = True) -> ModelConfig:
    """A model of width `dim`: r.layers blocks, the middle one's FFW replaced by `kind`."""
    peer = PEERConfig(num_experts=num_experts, heads=4, topk=8, d_key=32,
                      query_batchnorm=query_batchnorm)
    cfg = ModelConfig(vocab_size=256, dim=dim, n_layers=r.layers, n_heads=r.heads,
                      max_seq_len=r.seq_len, peer_blocks="none" if kind == "dense" else "middle",
                      sparse_kind="peer" if kind == "dense" else kind, peer=peer,
                      moe=MoEConfig(experts=8, topk=1, routing="expert"))
    cfg.validate()
    return cfg


def _lr(step: int, steps: int, r: Recipe) -> float:
    warm = max(1, int(r.warmup_frac * steps))
    if step < warm:
        return r.lr * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_eval(cfg: ModelConfig, steps: int, seed: int, data, r: Recipe) -> dict:
    """Train one model single-process for `steps` steps; held-out loss and the model."""
    from peer_dist.model.transformer import build_model, lm_loss
    from peer_dist.train.sparse_optim import RowSparseOptimizer, grad_sq_norm, scale_grads

    model = build_model(cfg, seed)
    tables = [p for layer in model.peer_layers() for p in (layer.experts.u, layer.experts.v)]
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    opt = torch.optim.AdamW(dense, lr=r.lr, betas=(0.9, 0.95), weight_decay=0.0)
    topt = RowSparseOptimizer(tables, "lazy_adam", lr=r.lr, betas=(0.9, 0.95))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        inputs, targets = data.batch("train", step, 0, r.batch, r.seq_len, seed)
        loss = lm_loss(model(inputs), targets)
        (loss + model.aux_loss()).backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in dense
                             if p.grad is not None) + float(grad_sq_norm(tables)))
        if r.grad_clip and norm > r.grad_clip:
            scale = r.grad_clip / (norm + 1e-6)
            for p in dense:
                if p.grad is not None:
                    p.grad.mul_(scale)
            scale_grads(tables, scale)
        lr = _lr(step, steps, r)
        for group in (*opt.param_groups, *topt.param_groups):
            group["lr"] = lr
        opt.step()
        topt.step()
        opt.zero_grad(set_to_none=True)
        for p in tables:
            p.grad = None
    train_s = time.perf_counter() - t0
    return {"val_loss": evaluate(model, data, r), "train_s": train_s, "model": model}


@torch.no_grad()
def evaluate(model, data, r: Recipe) -> float:
    from peer_dist.model.transformer import lm_loss

    model.eval()
    total, count = 0.0, 0
    for inputs, targets in data.eval_batches(r.batch, r.seq_len, max_batches=r.eval_batches):
        total += float(lm_loss(model(inputs), targets)) * targets.numel()
        count += targets.numel()
    model.train()
    return total / count


def open_corpus(path: str, max_bytes: int):
    from peer_dist.data import TokenDataset, prepare_dataset

    return TokenDataset(prepare_dataset(DataConfig(path=path, source="stdlib", max_bytes=max_bytes),
                                        log=lambda m: print(m, file=sys.stderr)))


# --------------------------------------------------------------------------- isoflop

def isoflop_rows(args: argparse.Namespace) -> list[dict]:
    from peer_dist.model.flops import param_counts, train_flops_per_token

    r = Recipe()
    data = open_corpus(args.data, args.data_bytes)
    rows, points = [], [(b, k, d, s) for b in args.budgets for k in args.kinds
                        for d in args.sizes for s in args.seeds]
    for i, (budget, kind, dim, seed) in enumerate(points, 1):
        cfg = model_config(kind, dim, r)
        fpt = train_flops_per_token(cfg, r.seq_len)
        tokens_per_step = r.batch * r.seq_len
        steps = max(1, round(budget / (fpt * tokens_per_step)))
        params, active = param_counts(cfg)
        out = train_eval(cfg, steps, seed, data, r)
        row = dict(kind=kind, dim=dim, seed=seed, budget=budget, params=params,
                   active_params=active, flops_per_token=fpt, steps=steps,
                   tokens=steps * tokens_per_step, train_flops=fpt * steps * tokens_per_step,
                   val_loss=out["val_loss"], val_ppl=math.exp(out["val_loss"]),
                   train_s=out["train_s"])
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        print(f"peer-study: {i}/{len(points)} {kind} d={dim} seed={seed} budget={budget:.1e}: "
              f"{steps} steps, val ppl {row['val_ppl']:.3f} ({row['train_s']:.0f} s)",
              file=sys.stderr)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (budget, kind, dim): mean and spread (max - min) of val ppl over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["kind"], row["dim"]), []).append(row)
    out = []
    for (budget, kind, dim), rs in groups.items():
        ppl = [x["val_ppl"] for x in rs]
        out.append(dict(budget=budget, kind=kind, dim=dim, params=rs[0]["params"],
                        active_params=rs[0]["active_params"], steps=rs[0]["steps"],
                        seeds=len(rs), val_ppl=statistics.mean(ppl),
                        spread=max(ppl) - min(ppl)))
    return out


def best_per_kind(summary: list[dict]) -> list[dict]:
    """At each budget, each kind's best width (the isoFLOP minimum)."""
    best: dict[tuple, dict] = {}
    for s in summary:
        key = (s["budget"], s["kind"])
        if key not in best or s["val_ppl"] < best[key]["val_ppl"]:
            best[key] = s
    return sorted(best.values(), key=lambda s: (s["budget"], s["val_ppl"]))


def write_isoflop(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "isoflop.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    lines = ["| budget (FLOPs) | kind | d | params | active params | steps | seeds | "
             "val ppl (mean) | spread |", "|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["budget"], s["kind"], s["dim"])):
        lines.append(f"| {s['budget']:.1e} | {s['kind']} | {s['dim']} | {s['params']:,} | "
                     f"{s['active_params']:,} | {s['steps']} | {s['seeds']} | "
                     f"{s['val_ppl']:.3f} | {s['spread']:.3f} |")
    lines += ["", "Best width per kind at each budget:", "",
              "| budget (FLOPs) | kind | d | val ppl | spread |", "|---|---|---|---|---|"]
    lines += [f"| {s['budget']:.1e} | {s['kind']} | {s['dim']} | {s['val_ppl']:.3f} | "
              f"{s['spread']:.3f} |" for s in best_per_kind(summary)]
    (out / "isoflop.md").write_text("\n".join(lines) + "\n")
    plot_isoflop(summary, out / "isoflop.png")


def plot_isoflop(summary: list[dict], path: Path) -> None:
    from peer_dist.tools.plots import _pyplot

    plt = _pyplot()
    budgets = sorted({s["budget"] for s in summary})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4.2), dpi=110,
                             squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        for i, kind in enumerate(KINDS):
            pts = sorted((s["params"], s["val_ppl"], s["spread"]) for s in summary
                         if s["budget"] == budget and s["kind"] == kind)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[p[2] / 2 for p in pts], label=kind, marker="o",
                            color=f"C{i}", capsize=3)
        ax.set_xscale("log")
        ax.set(title=f"{budget:.1e} training FLOPs", xlabel="parameters",
               ylabel="validation perplexity")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- experts

def experts_rows(args: argparse.Namespace) -> list[dict]:
    from peer_dist.train.expert_stats import ExpertStats

    r = Recipe()
    data = open_corpus(args.data, args.data_bytes)
    rows = []
    for n, bn, seed in itertools.product(args.num_experts, (True, False), args.seeds):
        cfg = model_config("peer", args.dim, r, num_experts=n, query_batchnorm=bn)
        out = train_eval(cfg, args.steps, seed, data, r)
        model = out["model"].eval()
        layer = model.peer_layers()[0]
        stats = ExpertStats(n)
        layer.record_routing = True
        with torch.no_grad():
            for inputs, _ in data.eval_batches(r.batch, r.seq_len, max_batches=r.eval_batches):
                model(inputs)
                stats.add(*layer.last_routing)
        row = dict(num_experts=n, query_batchnorm=bn, seed=seed, steps=args.steps,
                   dim=args.dim, usage=stats.usage(), unevenness=stats.unevenness(),
                   val_ppl=math.exp(out["val_loss"]))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        print(f"peer-study: N={n} BN={'on' if bn else 'off'} seed {seed}: usage "
              f"{100 * row['usage']:.1f}%, unevenness {row['unevenness']:.3f}", file=sys.stderr)
    return rows


def write_experts(rows: list[dict], out: Path) -> None:
    """experts.md: per (N, BN) the mean over seeds and the spread (max - min) of each figure;
    experts.csv: every trained model."""
    out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Mean over seeds {seeds}; spread = max - min.", "",
             "| N | query BN | usage | spread | unevenness | spread | val ppl | spread |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["num_experts"], r["query_batchnorm"]), []).append(r)
    for (n, bn), rs in groups.items():
        cells = []
        for key, fmt in (("usage", "{:.1%}"), ("unevenness", "{:.3f}"), ("val_ppl", "{:.3f}")):
            vals = [r[key] for r in rs]
            cells += [fmt.format(sum(vals) / len(vals)), fmt.format(max(vals) - min(vals))]
        lines.append(f"| {n:,} | {'on' if bn else 'off'} | " + " | ".join(cells) + " |")
    (out / "experts.md").write_text("\n".join(lines) + "\n")
    with open(out / "experts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- command line

def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed are positive numbers, "
                                         "comma-separated, e.g. 3e11,1e12")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed are integers >= 0, comma-separated")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"{bad or text!r}: allowed are {', '.join(KINDS)}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peer-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    iso = sub.add_parser("isoflop", help="PEER against dense, MoE and PKM at equal compute")
    iso.add_argument("--budgets", type=_floats, default=[1e12, 2e12],
                     help="training FLOPs per model")
    iso.add_argument("--kinds", type=_kinds, default=list(KINDS))
    iso.add_argument("--sizes", type=_ints, default=[64, 96, 128], help="model widths d")
    iso.add_argument("--seeds", type=_ints, default=[0, 1])
    ex = sub.add_parser("experts", help="expert usage and unevenness (the paper's Table 2)")
    ex.add_argument("--num-experts", type=_ints, default=[32 ** 2, 64 ** 2, 128 ** 2])
    ex.add_argument("--dim", type=int, default=64)
    ex.add_argument("--steps", type=int, default=600)
    ex.add_argument("--seeds", type=_ints, default=[0, 1])
    for q in (iso, ex):
        q.add_argument("--data", default="data/stdlib_study",
                       help="prepared corpus (made from this Python's library if missing)")
        q.add_argument("--data-bytes", type=int, default=20_000_000,
                       help="raw text read when the corpus is prepared")
        q.add_argument("--out", default="runs/study", help="output folder")
        q.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
        q.add_argument("--json", action="store_true", help="one JSON object per model")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.command == "isoflop":
        if any(d % 4 or d < 32 for d in args.sizes):
            raise SystemExit(f"peer-study: --sizes={args.sizes}: allowed are widths >= 32 "
                             "divisible by 4 (4 attention heads of even size)")
        rows = isoflop_rows(args)
        write_isoflop(rows, out)
    else:
        for n in args.num_experts:
            if math.isqrt(n) ** 2 != n or math.isqrt(n) < 8:
                raise SystemExit(f"peer-study: --num-experts {n}: allowed are perfect squares "
                                 ">= 64 (top-k 8 of sqrt(N) sub-keys)")
        rows = experts_rows(args)
        write_experts(rows, out)
    print(f"peer-study: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
