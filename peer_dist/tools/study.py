"""peer-study: the paper's quality claims at small scale, on this machine.

    peer-study isoflop                    # PEER against dense, MoE and PKM at equal compute
    peer-study isoflop --budgets 2.5e11,5e11,1e12 --sizes 32,48,64 --json   # larger: hours
    peer-study experts                    # Table 2: expert usage and unevenness, BN on and off
    peer-study experts-scaling            # Figure 3: more experts at equal active params

isoflop: for each FLOP budget, each kind and each model width, a model is trained for
budget / (training FLOPs per token) tokens (peer_dist/model/flops.py) on the local default
corpus (this Python's library, byte tokens). Every kind gets the same data order, tokenizer,
optimizer (AdamW on dense weights, lazy Adam on PEER's tables, both at one learning rate),
warmup + cosine schedule and gradient clipping; no per-kind tuning. The sparse layer replaces
the middle block's FFW (as in the paper); MoE is token choice (top-1 of 8 experts with the
Switch load-balancing loss); `moe_ec` (expert choice, the paper's baseline) picks tokens over
the whole batch, future positions included, so its loss is not a causal LM loss: it is
reported, marked non-causal, and left out of the ranking. The held-out split is cut in two:
the width of each kind at each budget is chosen on the selection half (mean over seeds) and
its perplexity reported on the test half. When the chosen width is the smallest or largest of
the sweep, the sweep is extended along WIDTHS until the optimum is inside it (--max-extend
steps at most; an optimum left at an edge is flagged). Writes OUT/isoflop.md, .csv and .png;
--json prints one object per trained model.

experts: PEER trained with and without query BatchNorm for several N, then expert usage
(share of experts any held-out token selected) and unevenness (KL of the gate mass from
uniform) on the held-out split, as the paper's Table 2.

experts-scaling: PEER with the same active parameters and FLOPs per token (d, h, k fixed) for
N from 32^2 to 512^2, the same recipe and steps, several seeds: test perplexity and expert
usage against N (the paper's Figure 3 at small scale).
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

from peer_dist import cli
from peer_dist.config import ConfigError, DataConfig, ModelConfig, MoEConfig, PEERConfig

KINDS = ("dense", "moe", "pkm", "peer", "moe_ec")
DEFAULT_KINDS = ("dense", "moe", "pkm", "peer")
NON_CAUSAL = ("moe_ec",)  # expert choice sees the batch's future tokens: not ranked
WIDTHS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # where a sweep is extended (8 | d)


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
    sparse = {"dense": "peer", "moe_ec": "moe"}.get(kind, kind)
    cfg = ModelConfig(vocab_size=256, dim=dim, n_layers=r.layers, n_heads=r.heads,
                      max_seq_len=r.seq_len, peer_blocks="none" if kind == "dense" else "middle",
                      sparse_kind=sparse, peer=peer,
                      moe=MoEConfig(experts=8, topk=1,
                                    routing="expert" if kind == "moe_ec" else "token"))
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
    selection, test = evaluate(model, data, r)
    return {"selection_loss": selection, "test_loss": test, "train_s": train_s, "model": model}


def held_out(data, r: Recipe, part: str) -> list:
    """The held-out split's first 2 * r.eval_batches batches (fewer if it is smaller), cut in
    two: `selection` (the first half: choosing widths) and `test` (the second: reporting)."""
    batches = list(data.eval_batches(r.batch, r.seq_len, max_batches=2 * r.eval_batches))
    if len(batches) < 2:
        cli.fail(f"peer-study: the held-out split has {len(batches)} batch of "
                         f"{r.batch} x {r.seq_len} tokens: allowed are 2 or more (a larger "
                         "--data-bytes)")
    half = (len(batches) + 1) // 2
    return batches[:half] if part == "selection" else batches[half:]


@torch.no_grad()
def evaluate(model, data, r: Recipe) -> tuple[float, float]:
    """Mean token loss on the selection and on the test half of the held-out split."""
    from peer_dist.model.transformer import lm_loss

    model.eval()
    out = []
    for part in ("selection", "test"):
        total, count = 0.0, 0
        for inputs, targets in held_out(data, r, part):
            total += float(lm_loss(model(inputs), targets)) * targets.numel()
            count += targets.numel()
        out.append(total / count)
    model.train()
    return out[0], out[1]


def check_data(path: str) -> None:
    """--data before any work: a prepared corpus, or a new path where one can be written;
    anything else is one line (SystemExit), never replaced."""
    from peer_dist.errors import folder_error

    allowed = ("allowed is a folder written by peer-prepare, or a path that does not exist yet "
               "(prepared there from this Python's library)")
    if not path.strip():
        cli.fail(f"peer-study: --data={path!r} is invalid: it is empty; {allowed}")
    if Path(path).exists() and not (Path(path) / "meta.json").is_file():
        cli.fail(f"peer-study: --data={path!r} exists and holds no prepared dataset (no "
                 f"meta.json): {allowed}")
    problem = None if Path(path).exists() else folder_error(Path(path).parent)
    if problem:
        cli.fail(f"peer-study: --data={path!r} is invalid: {problem}; {allowed}")


def open_corpus(path: str, max_bytes: int):
    """The prepared corpus at `path`, made from this Python's library when `path` does not
    exist (check_data)."""
    from peer_dist.data import TokenDataset, prepare_dataset

    check_data(path)
    try:
        return TokenDataset(prepare_dataset(
            DataConfig(path=path, source="stdlib", max_bytes=max_bytes),
            log=lambda m: print(m, file=sys.stderr)))
    except (OSError, ValueError) as e:
        cli.fail(f"peer-study: --data={path!r}: {e}")


# --------------------------------------------------------------------------- isoflop

def least_budget(kinds: list[str], dims: list[int], r: Recipe) -> float:
    """The smallest budget at which every (kind, width) trains at least one whole step: the
    FLOPs of the costliest one's step (isoflop_model rounds the steps)."""
    from peer_dist.model.flops import train_flops_per_token

    return max(train_flops_per_token(model_config(k, d, r), r.seq_len) * r.batch * r.seq_len
               for k in kinds for d in dims)


def isoflop_model(kind: str, dim: int, budget: float, seed: int, data, r: Recipe) -> dict:
    """Train one model on `budget` FLOPs; its row (what --json prints)."""
    from peer_dist.model.flops import param_counts, train_flops_per_token

    cfg = model_config(kind, dim, r)
    fpt = train_flops_per_token(cfg, r.seq_len)
    tokens_per_step = r.batch * r.seq_len
    steps = max(1, round(budget / (fpt * tokens_per_step)))
    params, active = param_counts(cfg)
    out = train_eval(cfg, steps, seed, data, r)
    return dict(kind=kind, routing=cfg.moe.routing if cfg.sparse_kind == "moe" and
                kind != "dense" else None, causal=kind not in NON_CAUSAL, dim=dim, seed=seed,
                budget=budget, params=params, active_params=active, flops_per_token=fpt,
                steps=steps, tokens=steps * tokens_per_step,
                train_flops=fpt * steps * tokens_per_step,
                selection_loss=out["selection_loss"], test_loss=out["test_loss"],
                selection_ppl=math.exp(out["selection_loss"]),
                test_ppl=math.exp(out["test_loss"]), train_s=out["train_s"])


def next_width(widths: list[int], best: int) -> int | None:
    """The width that extends a sweep whose best is at an edge: the WIDTHS neighbour beyond
    it (None when the optimum is inside the sweep or the ladder ends)."""
    lo, hi = min(widths), max(widths)
    if len(widths) >= 2 and lo < best < hi:
        return None
    if best == lo:
        smaller = [w for w in WIDTHS if w < lo]
        return smaller[-1] if smaller else None
    larger = [w for w in WIDTHS if w > hi]
    return larger[0] if larger else None


def sweep(kind: str, budget: float, args, data, r: Recipe, log) -> list[dict]:
    """Every seed at every width of --sizes, extended while the best mean selection perplexity
    sits at an edge of the sweep (at most args.max_extend extra widths)."""
    rows: list[dict] = []
    widths = list(args.sizes)
    todo = list(widths)
    for _ in range(args.max_extend + 1):
        for dim in todo:
            for seed in args.seeds:
                rows.append(isoflop_model(kind, dim, budget, seed, data, r))
                log(rows[-1])
        means = {d: statistics.mean(x["selection_ppl"] for x in rows if x["dim"] == d)
                 for d in widths}
        extra = next_width(widths, min(means, key=means.get))
        if extra is None:
            break
        widths.append(extra)
        todo = [extra]
    return rows


def isoflop_rows(args: argparse.Namespace) -> list[dict]:
    r = Recipe()
    data = open_corpus(args.data, args.data_bytes)
    rows: list[dict] = []
    t0, done = time.perf_counter(), [0]

    def log(row: dict) -> None:
        done[0] += 1
        if args.json:
            print(json.dumps(row), flush=True)
        print(f"peer-study: {done[0]} {row['kind']} d={row['dim']} seed={row['seed']} "
              f"budget={row['budget']:.1e}: {row['steps']} steps, selection ppl "
              f"{row['selection_ppl']:.3f}, test ppl {row['test_ppl']:.3f} "
              f"({row['train_s']:.0f} s; {time.perf_counter() - t0:.0f} s in all)",
              file=sys.stderr)

    for budget in args.budgets:
        for kind in args.kinds:
            rows += sweep(kind, budget, args, data, r, log)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (budget, kind, dim): mean selection and test perplexity over seeds, and the test
    perplexity's spread (max - min)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["kind"], row["dim"]), []).append(row)
    out = []
    for (budget, kind, dim), rs in groups.items():
        test = [x["test_ppl"] for x in rs]
        out.append(dict(budget=budget, kind=kind, dim=dim, params=rs[0]["params"],
                        active_params=rs[0]["active_params"], steps=rs[0]["steps"],
                        seeds=len(rs), causal=rs[0]["causal"],
                        selection_ppl=statistics.mean(x["selection_ppl"] for x in rs),
                        test_ppl=statistics.mean(test), spread=max(test) - min(test)))
    return out


def best_per_kind(summary: list[dict]) -> list[dict]:
    """At each budget, each kind's width chosen on the selection split (mean over seeds), with
    whether the sweep brackets it, and its test perplexity's gap to dense's in percent."""
    best: dict[tuple, dict] = {}
    for s in summary:
        key = (s["budget"], s["kind"])
        if key not in best or s["selection_ppl"] < best[key]["selection_ppl"]:
            best[key] = s
    out = []
    for (budget, kind), s in best.items():
        dims = [x["dim"] for x in summary if x["budget"] == budget and x["kind"] == kind]
        dense = best.get((budget, "dense"))
        out.append(dict(s, bracketed=min(dims) < s["dim"] < max(dims),
                        gap_to_dense_pct=100 * (s["test_ppl"] / dense["test_ppl"] - 1)
                        if dense else None))
    # ranked kinds by test perplexity, the non-causal ones after them
    return sorted(out, key=lambda s: (s["budget"], not s["causal"], s["test_ppl"]))


def write_isoflop(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "isoflop.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Seeds {seeds}; ppl = mean over seeds; spread = max - min of the test ppl. "
             "Widths are chosen on the selection half of the held-out split, perplexity "
             "reported on the test half.", "",
             "| budget (FLOPs) | kind | d | params | active params | steps | seeds | "
             "selection ppl | test ppl | spread |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["budget"], s["kind"], s["dim"])):
        lines.append(f"| {s['budget']:.1e} | {s['kind']} | {s['dim']} | {s['params']:,} | "
                     f"{s['active_params']:,} | {s['steps']} | {s['seeds']} | "
                     f"{s['selection_ppl']:.3f} | {s['test_ppl']:.3f} | {s['spread']:.3f} |")
    lines += ["", "Best width per kind at each budget (chosen on the selection split; test "
              "ppl; ranked, non-causal kinds last and unranked):", "",
              "| budget (FLOPs) | kind | d | bracketed | test ppl | spread | vs dense |",
              "|---|---|---|---|---|---|---|"]
    for s in best_per_kind(summary):
        gap = "" if s["gap_to_dense_pct"] is None else f"{s['gap_to_dense_pct']:+.1f}%"
        kind = s["kind"] + ("" if s["causal"] else " (non-causal, not ranked)")
        lines.append(f"| {s['budget']:.1e} | {kind} | {s['dim']} | "
                     f"{'yes' if s['bracketed'] else 'no (edge)'} | {s['test_ppl']:.3f} | "
                     f"{s['spread']:.3f} | {gap} |")
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
            pts = sorted((s["params"], s["test_ppl"], s["spread"]) for s in summary
                         if s["budget"] == budget and s["kind"] == kind)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[p[2] / 2 for p in pts], label=kind, marker="o",
                            color=f"C{i}", capsize=3)
        ax.set_xscale("log")
        ax.set(title=f"{budget:.1e} training FLOPs", xlabel="parameters",
               ylabel="test perplexity")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- experts

@torch.no_grad()
def expert_stats(model, n: int, batches):
    """Expert usage and gate mass of the (first) PEER layer over `batches`."""
    from peer_dist.train.expert_stats import ExpertStats

    model.eval()
    layer = model.peer_layers()[0]
    stats = ExpertStats(n)
    layer.record_routing = True
    for inputs, _ in batches:
        model(inputs)
        stats.add(*layer.last_routing)
    layer.record_routing = False
    return stats


def experts_rows(args: argparse.Namespace) -> list[dict]:
    r = Recipe()
    data = open_corpus(args.data, args.data_bytes)
    rows = []
    for n, bn, seed in itertools.product(args.num_experts, (True, False), args.seeds):
        cfg = model_config("peer", args.dim, r, num_experts=n, query_batchnorm=bn)
        out = train_eval(cfg, args.steps, seed, data, r)
        stats = expert_stats(out["model"], n, held_out(data, r, "selection"))
        # the held-out split's first r.eval_batches batches, as this table always used
        row = dict(num_experts=n, query_batchnorm=bn, seed=seed, steps=args.steps,
                   dim=args.dim, usage=stats.usage(), unevenness=stats.unevenness(),
                   val_ppl=math.exp(out["selection_loss"]))
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


# --------------------------------------------------------------------------- experts-scaling

def scaling_rows(args: argparse.Namespace) -> list[dict]:
    """PEER at one width, heads and top-k (so the same active parameters and FLOPs per token,
    up to the sub-key scores' 2 H sqrt(N) d_key) for each N, each seed, args.steps steps."""
    from peer_dist.model.flops import param_counts, train_flops_per_token

    r = Recipe()
    data = open_corpus(args.data, args.data_bytes)
    rows, t0 = [], time.perf_counter()
    for n, seed in itertools.product(args.num_experts, args.seeds):
        cfg = model_config("peer", args.dim, r, num_experts=n)
        params, active = param_counts(cfg)
        out = train_eval(cfg, args.steps, seed, data, r)
        stats = expert_stats(out["model"], n, held_out(data, r, "test"))
        row = dict(num_experts=n, seed=seed, steps=args.steps, dim=args.dim, params=params,
                   active_params=active, flops_per_token=train_flops_per_token(cfg, r.seq_len),
                   usage=stats.usage(), unevenness=stats.unevenness(),
                   selection_ppl=math.exp(out["selection_loss"]),
                   test_ppl=math.exp(out["test_loss"]), train_s=out["train_s"])
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        print(f"peer-study: N={n} seed {seed}: test ppl {row['test_ppl']:.3f}, usage "
              f"{100 * row['usage']:.1f}% ({row['train_s']:.0f} s; "
              f"{time.perf_counter() - t0:.0f} s in all)", file=sys.stderr)
    return rows


def write_scaling(rows: list[dict], out: Path) -> None:
    """experts_scaling.md (mean and spread over seeds per N), .csv (every model), .png."""
    out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"PEER, d = {rows[0]['dim']}, {rows[0]['steps']} steps each; mean over seeds "
             f"{seeds}, spread = max - min; perplexity and usage on the test half of the "
             "held-out split.", "",
             "| N | params | active params | train FLOPs/token | test ppl | spread | usage | "
             "spread | unevenness |", "|---|---|---|---|---|---|---|---|---|"]
    for n, rs in _by(rows, "num_experts").items():
        ppl, use = [x["test_ppl"] for x in rs], [x["usage"] for x in rs]
        lines.append(f"| {n:,} | {rs[0]['params']:,} | {rs[0]['active_params']:,} | "
                     f"{rs[0]['flops_per_token']:,.0f} | {statistics.mean(ppl):.3f} | "
                     f"{max(ppl) - min(ppl):.3f} | {statistics.mean(use):.1%} | "
                     f"{max(use) - min(use):.1%} | "
                     f"{statistics.mean(x['unevenness'] for x in rs):.3f} |")
    (out / "experts_scaling.md").write_text("\n".join(lines) + "\n")
    with open(out / "experts_scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_scaling(rows, out / "experts_scaling.png")


def _by(rows: list[dict], key: str) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return dict(sorted(groups.items()))


def plot_scaling(rows: list[dict], path: Path) -> None:
    from peer_dist.tools.plots import _pyplot

    plt = _pyplot()
    groups = _by(rows, "num_experts")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, key, label in ((axes[0], "test_ppl", "test perplexity"),
                           (axes[1], "usage", "expert usage")):
        ns = list(groups)
        vals = [[x[key] for x in groups[n]] for n in ns]
        ax.errorbar(ns, [statistics.mean(v) for v in vals],
                    yerr=[(max(v) - min(v)) / 2 for v in vals], marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="experts N", ylabel=label)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

# Bounds of the flags: beyond them a value is a typo, not a setting.
MAX_SEED = 2 ** 63 - 1  # what torch's generators take
MAX_WIDTH = 1 << 16  # --sizes, --dim (a width of 65536 is already beyond this machine)
MAX_EXPERTS = 1 << 40  # --num-experts
# --budgets: peer-study trains on the CPU, at about 6e9 FLOP/s on 2 cores (the default study,
# 9e12 FLOPs, takes 26 min), so 1e15 FLOPs is about two days for one model of the 100 or more
# a study trains: a larger budget is a typo (1e30 ran for ever)
MAX_BUDGET = 1e15


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in cli.items(text) or ()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and 0 < v <= MAX_BUDGET for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid: allowed are numbers > 0 and <= 1e15, "
            "comma-separated, e.g. 3e10,1e11 (training FLOPs per model, on the CPU: 1e15 is "
            "about two days for each model)")
    return values


SEEDS = cli.int_list(0, MAX_SEED)


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="peer-study", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    iso = sub.add_parser("isoflop", help="PEER against dense, MoE and PKM at equal compute")
    # the defaults: the whole study in 26 min on 2 CPU cores (129 models; README)
    iso.add_argument("--budgets", type=_floats, default=[3e10, 6e10, 1.2e11],
                     help="training FLOPs per model")
    iso.add_argument("--kinds", type=cli.names(KINDS), default=list(DEFAULT_KINDS),
                     help=f"any of {', '.join(KINDS)} (moe_ec: expert choice, non-causal, "
                          "not ranked)")
    iso.add_argument("--sizes", type=cli.int_list(8, MAX_WIDTH), default=[16, 24, 32],
                     help="model widths d to start from (multiples of 8)")
    iso.add_argument("--seeds", type=SEEDS, default=[0, 1, 2])
    iso.add_argument("--max-extend", type=cli.ints(0, 64), default=2,
                     help="widths added per kind and budget while the optimum is at an edge")
    ex = sub.add_parser("experts", help="expert usage and unevenness (the paper's Table 2)")
    ex.add_argument("--num-experts", type=cli.int_list(64, MAX_EXPERTS),
                    default=[32 ** 2, 64 ** 2, 128 ** 2])
    ex.add_argument("--dim", type=cli.ints(8, MAX_WIDTH), default=64)
    ex.add_argument("--steps", type=cli.ints(1, cli.MAX_COUNT), default=600)
    ex.add_argument("--seeds", type=SEEDS, default=[0, 1])
    sc = sub.add_parser("experts-scaling", help="perplexity and usage against N at equal "
                        "active parameters (the paper's Figure 3)")
    sc.add_argument("--num-experts", type=cli.int_list(64, MAX_EXPERTS),
                    default=[32 ** 2, 64 ** 2, 128 ** 2, 256 ** 2, 512 ** 2])
    sc.add_argument("--dim", type=cli.ints(8, MAX_WIDTH), default=64)
    sc.add_argument("--steps", type=cli.ints(1, cli.MAX_COUNT), default=600)
    sc.add_argument("--seeds", type=SEEDS, default=[0, 1, 2])
    for q in (iso, ex, sc):
        q.add_argument("--data", default="data/stdlib_study",
                       help="prepared corpus (made from this Python's library if missing)")
        q.add_argument("--data-bytes", type=cli.ints(1), default=20_000_000,
                       help="raw text read when the corpus is prepared")
        q.add_argument("--out", default="runs/study", help="output folder")
        q.add_argument("--threads", type=cli.ints(0, cli.MAX_THREADS), default=0,
                       help="torch threads (0: all cores)")
        q.add_argument("--json", action="store_true", help="one JSON object per model")
    return p


def memory_problem(args: argparse.Namespace) -> str | None:
    """The one-line error for a model of the study that cannot fit in this machine's memory at
    all (fp32 weights and Adam's two moments: 12 bytes a parameter), before the first trains."""
    from peer_dist.model.flops import param_counts
    from peer_dist.tools.bench import memory_error

    r = Recipe()
    if args.command == "isoflop":
        points = [(f"--sizes={d}", model_config(k, d, r)) for d in args.sizes for k in args.kinds]
    else:
        points = [(f"--num-experts={n} --dim={args.dim}",
                   model_config("peer", args.dim, r, num_experts=n)) for n in args.num_experts]
    for flags, cfg in points:
        bad = memory_error(flags, "a model's fp32 weights and Adam's two moments",
                           12 * param_counts(cfg)[0])
        if bad:
            return bad
    return None


def main(argv: list[str] | None = None) -> None:
    from peer_dist.errors import folder_error

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out, t0 = Path(args.out), time.perf_counter()
    if args.command == "isoflop":
        if any(d % 8 or d < 8 for d in args.sizes) or args.max_extend < 0:
            cli.fail(f"peer-study: --sizes={args.sizes} --max-extend="
                             f"{args.max_extend}: allowed are widths >= 8 divisible by 8 (4 "
                             "attention heads of even size) and --max-extend >= 0")
    else:
        for n in args.num_experts:
            if math.isqrt(n) ** 2 != n or math.isqrt(n) < 8:
                cli.fail(f"peer-study: --num-experts {n}: allowed are perfect squares "
                                 ">= 64 (top-k 8 of sqrt(N) sub-keys)")
            try:  # the model of every point, before the first one trains
                model_config("peer", args.dim, Recipe(), num_experts=n)
            except ConfigError as e:
                cli.fail(f"peer-study: --dim={args.dim}: {e}")
    bad = memory_problem(args)
    if bad:
        cli.fail(f"peer-study: {bad}")
    if args.command == "isoflop":
        least = least_budget(args.kinds, args.sizes, Recipe())
        if min(args.budgets) < least:  # each model would train one step whatever its budget
            cli.fail(f"peer-study: --budgets={min(args.budgets):g} is invalid: below one "
                     f"training step of the largest model of --sizes={args.sizes} "
                     f"({least:.2g} FLOPs), so a model would train more than its budget; "
                     f"allowed are budgets >= {least:.2g}")
    check_data(args.data)
    made = not out.exists()
    problem = folder_error(args.out, make=True)
    if problem:  # made now: a bad --out is found before the training, not after it
        cli.fail(f"peer-study: --out={args.out!r} is invalid: {problem}; allowed is a folder, "
                 "new or existing, that can be written")
    try:
        if args.command == "isoflop":
            write_isoflop(isoflop_rows(args), out)
        elif args.command == "experts":
            write_experts(experts_rows(args), out)
        else:
            write_scaling(scaling_rows(args), out)
    except BaseException:  # stopped or failed before writing: no empty folder of ours left
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    print(f"peer-study {args.command}: wrote {out} in {time.perf_counter() - t0:.0f} s "
          f"(wall time)", file=sys.stderr)


if __name__ == "__main__":
    main()
