"""peer-scale: scaling studies of expert-table memory per rank.

  peer-scale predict --num-experts 65536,262144,1048576 --dim 256,1024 --ep 1,2,4,8 \\
                     --world-size 8 --out runs/scale/predict
  peer-scale measure --config configs/tiny.yaml --num-experts 16384,65536,262144,1048576 \
                     --dim 64 --ep 1,2,4 --steps 5 --out runs/scale/measure
  peer-scale plan --nodes 2 --gpus-per-node 8 --gpu-mem-gib 80 --num-experts 1048576 --dim 1024

predict and measure write DIR/table.md, DIR/table.csv, DIR/plot.png and TensorBoard scalars
under DIR/tb (step = number of experts); --json prints one JSON object per point and line.
The arithmetic lives in memory_model.py; measure launches the real trainer (peer-train) under
torchrun and reads the per-rank memory it reports.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer_dist.config import ConfigError, ModelConfig, load_config
from peer_dist.tools import memory_model as mm
from peer_dist.tools.pngplot import Series, write_plot

GIB = 1024 ** 3
OPTIMIZER_RANK = {"lazy_adam": 0, "dense_adam": 1, "adagrad": 2, "sgd": 3}  # plan: best first

# Row keys: the setup of a point, then predict's byte counts (per rank).
SETUP_KEYS = ("num_experts", "dim", "layers", "ep", "world_size", "dtype", "table_dtype",
              "table_optimizer", "zero_stage", "strategy", "tokens_per_rank")
PREDICT_KEYS = ("expert_params", "expert_optim", "expert_grads", "dense", "activations", "a2a",
                "expert_bytes_per_rank_predicted", "total_bytes_per_rank_predicted",
                "a2a_bytes_moved_predicted")


# --------------------------------------------------------------------------- arguments

def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers"
                                         ) from err


def _strs(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _grid_args(p: argparse.ArgumentParser, measure: bool) -> None:
    p.add_argument("--config", default=None, help="base YAML config (model shape, batch)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the base config, e.g. model.n_layers=2 (repeatable)")
    p.add_argument("--num-experts", type=_ints, default=[4096, 16384] if measure
                   else [65536, 262144, 1048576], help="N values (perfect squares)")
    p.add_argument("--dim", type=_ints, default=[64] if measure else [256, 1024])
    p.add_argument("--layers", type=_ints, default=None,
                   help="PEER layers (middle blocks); default: the config's peer_blocks")
    p.add_argument("--ep", type=_ints, default=[1, 2] if measure else [1, 2, 4, 8])
    p.add_argument("--world-size", type=_ints, default=None,
                   help="ranks; default: each point's EP (one expert-parallel group)")
    p.add_argument("--dtype", type=_strs, default=["fp32"],
                   help="fp32 | bf16: dense part, activations and messages")
    p.add_argument("--table-dtype", default="fp32", choices=sorted(mm.DTYPE_BYTES),
                   help="expert shards (the trainer keeps them fp32; bf16 is what-if only)")
    p.add_argument("--table-state-dtype", default="fp32", choices=sorted(mm.DTYPE_BYTES),
                   help="the table optimizer's state (optim.table_state_dtype)")
    p.add_argument("--table-optimizer", type=_strs, default=["lazy_adam"],
                   help=f"any of {list(mm.TABLE_OPTIMIZERS)}")
    p.add_argument("--zero-stage", type=_ints, default=[0])
    p.add_argument("--strategy", type=_strs, default=["dispatch"],
                   help=f"any of {list(mm.STRATEGIES)}")
    p.add_argument("--tokens-per-rank", type=int, default=None,
                   help="tokens per rank per micro-batch; default batch_size * seq_len")
    p.add_argument("--out", default=None, help="output folder (table.md, table.csv, plot.png, tb/)")
    p.add_argument("--json", action="store_true", help="print one JSON object per point")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peer-scale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _grid_args(sub.add_parser("predict", help="memory model over a grid"), measure=False)
    m = sub.add_parser("measure", help="short torchrun runs of peer-train over a grid")
    _grid_args(m, measure=True)
    m.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    m.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    m.add_argument("--keep-runs", action="store_true", help="keep each run's folder")
    m.add_argument("--data-bytes", type=int, default=2_000_000,
                   help="raw text bytes to prepare when the data folder does not exist yet")
    m.add_argument("--data", default=None,
                   help="prepared data folder for the runs (default: OUT/data, made on first use)")
    _plan_args(sub.add_parser("plan", help="settings that fit a cluster, best first"))
    return parser


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per GPU, GiB")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of memory kept free (allocator slack, runtime context)")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=sorted(mm.DTYPE_BYTES))
    p.add_argument("--table-dtype", default="fp32", choices=sorted(mm.DTYPE_BYTES))
    p.add_argument("--table-state-dtype", default="fp32", choices=sorted(mm.DTYPE_BYTES))
    p.add_argument("--strategy", default="dispatch", choices=mm.STRATEGIES)
    p.add_argument("--tokens-per-rank", type=int, default=None)
    p.add_argument("--top", type=int, default=20, help="rows to print")
    p.add_argument("--json", action="store_true")


# --------------------------------------------------------------------------- grid

def model_for(base: ModelConfig, num_experts: int, dim: int, layers: int | None) -> ModelConfig:
    """A copy of `base` with N experts, model dim d and `layers` PEER blocks in the middle."""
    m = copy.deepcopy(base)
    m.dim, m.peer.num_experts = dim, num_experts
    if layers is not None:
        m.n_layers = max(m.n_layers, layers)
        start = (m.n_layers - layers) // 2
        m.peer_blocks = ",".join(str(i) for i in range(start, start + layers)) or "none"
    m.validate()
    return m


def base_config(args: argparse.Namespace):
    try:
        return load_config(args.config, args.set)
    except ConfigError as err:
        raise SystemExit(f"peer-scale: {err}") from err


def grid(args: argparse.Namespace) -> list[mm.Setup]:
    """Every combination of the grid flags; points whose EP does not divide the world size are
    skipped."""
    cfg = base_config(args)
    tokens = args.tokens_per_rank or cfg.train.batch_size * cfg.train.seq_len
    points = []
    for n, d, layers, ep, world, dtype, opt, zero, strat in itertools.product(
            args.num_experts, args.dim, args.layers or [None], args.ep,
            args.world_size or [None], args.dtype, args.table_optimizer, args.zero_stage,
            args.strategy):
        world = world or ep
        if world % ep:
            continue
        try:
            s = mm.Setup(model_for(cfg.model, n, d, layers), ep=ep, world_size=world, dtype=dtype,
                         table_dtype=args.table_dtype, table_optimizer=opt, zero_stage=zero,
                         table_state_dtype=args.table_state_dtype,
                         strategy=strat, tokens_per_rank=tokens).validate()
        except (ValueError, ConfigError) as err:
            raise SystemExit(f"peer-scale: {err}") from err
        points.append(s)
    if not points:
        raise SystemExit("peer-scale: the grid is empty (no --ep value divides a --world-size)")
    return points


def setup_row(s: mm.Setup) -> dict:
    return {"num_experts": s.n, "dim": s.d, "layers": s.layers, "ep": s.ep,
            "world_size": s.world_size, "dtype": s.dtype, "table_dtype": s.table_dtype,
            "table_optimizer": s.table_optimizer, "table_state_dtype": s.table_state_dtype,
            "zero_stage": s.zero_stage, "strategy": s.strategy,
            "tokens_per_rank": s.tokens_per_rank}


def predict_row(s: mm.Setup) -> dict:
    b = mm.breakdown(s)
    row = setup_row(s)
    row.update({k: b[k] for k in mm.COMPONENTS})
    row["expert_bytes_per_rank_predicted"] = b["expert_tables"]
    row["total_bytes_per_rank_predicted"] = b["total"]
    row["a2a_bytes_moved_predicted"] = mm.a2a_bytes_moved(s)
    return row


# --------------------------------------------------------------------------- outputs

def human(v: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(v) >= size:
            return f"{v / size:.2f} {unit}"
    return f"{v:.0f} B"


def _cell(key: str, value) -> str:
    if isinstance(value, float) and key.endswith(("_err", "error")):
        return f"{100 * value:+.3f}%"
    if isinstance(value, float) and key.endswith("_s"):
        return f"{value:.3f}"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            key in PREDICT_KEYS or "bytes" in key):
        return human(value)
    return str(value)


def markdown(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(k, r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def varying(rows: list[dict], keys: tuple[str, ...]) -> list[str]:
    """Setup keys (other than N) that take more than one value: they name the plot series."""
    return [k for k in keys if k != "num_experts" and len({r[k] for r in rows}) > 1]


def series_name(row: dict, keys: list[str]) -> str:
    short = {"dim": "d", "layers": "L", "ep": "ep", "world_size": "w", "zero_stage": "z",
             "table_optimizer": "", "strategy": "", "dtype": "", "tokens_per_rank": "t"}
    return " ".join(f"{short.get(k, k)}{'=' if short.get(k, k) else ''}{row[k]}"
                    for k in keys) or "all"


def write_outputs(rows: list[dict], keys: list[str], out: Path, kind: str,
                  plot_series: list[tuple[str, str]]) -> dict[str, str]:
    """table.md (N, the setup keys that vary, results), table.csv (every key), plot.png and
    TensorBoard scalars under out/tb.

    plot_series: (row key, style) pairs drawn against N, one series per varying setup."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(rows, shown_keys(rows, keys)))
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    groups = group_rows(rows)
    series = []
    for color, (name, members) in enumerate(groups.items()):
        for key, style in plot_series:
            pts = [(r["num_experts"], r[key]) for r in members if r.get(key)]
            label = f"{name} {key.replace('_bytes_per_rank', '').replace('_', ' ')}"
            series.append(Series(label, [p[0] for p in pts], [p[1] for p in pts], style, color))
    renderer = write_plot(out / "plot.png", series, f"peer-scale {kind}: bytes per rank",
                          "experts N", "bytes per rank")
    write_tensorboard(out / "tb", kind, groups, [k for k, _ in plot_series])
    return {"table_md": str(out / "table.md"), "table_csv": str(out / "table.csv"),
            "plot": str(out / "plot.png"), "renderer": renderer, "tb": str(out / "tb")}


def shown_keys(rows: list[dict], keys: list[str]) -> list[str]:
    """keys less the setup keys (other than N) that have one value in every row."""
    fixed = set(SETUP_KEYS) - {"num_experts"} - set(varying(rows, SETUP_KEYS))
    return [k for k in keys if k not in fixed]


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    keys = varying(rows, SETUP_KEYS)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(series_name(r, keys), []).append(r)
    return groups


def write_tensorboard(path: Path, kind: str, groups: dict[str, list[dict]],
                      keys: list[str]) -> None:
    """One scalar per (series, key), with the number of experts as the step."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path)) as writer:
        for name, members in groups.items():
            tag_base = f"{kind}/{name.replace(' ', '_').replace('=', '')}"
            for r in members:
                for key in keys:
                    if isinstance(r.get(key), (int, float)):
                        writer.add_scalar(f"{tag_base}/{key}", float(r[key]), r["num_experts"])


def emit(rows: list[dict], keys: list[str], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(markdown(rows, keys), end="")


# --------------------------------------------------------------------------- predict

def cmd_predict(args: argparse.Namespace) -> None:
    rows = [predict_row(s) for s in grid(args)]
    keys = list(SETUP_KEYS) + list(PREDICT_KEYS)
    if args.out:
        write_outputs(rows, keys, Path(args.out), "predict",
                      [("total_bytes_per_rank_predicted", "line")])
    emit(rows, keys if args.json else shown_keys(rows, keys), args.json)


# --------------------------------------------------------------------------- plan

def plan_rows(args: argparse.Namespace) -> list[dict]:
    """Every EP (divisor of the world) x ZeRO stage x table optimizer, best first: the
    strongest table optimizer, then an EP group inside one node (all-to-all stays on the node's
    links), then the smallest EP (fewest owners per token), then ZeRO 0-2 before 3 (stages 1
    and 2 move the same bytes as plain data parallelism, stage 3 adds parameter all-gathers),
    then the least memory. `fits` marks those within the usable memory."""
    cfg = base_config(args)
    m = model_for(cfg.model, args.num_experts or cfg.model.peer.num_experts,
                  args.dim or cfg.model.dim, args.layers)
    world = args.nodes * args.gpus_per_node
    budget = args.gpu_mem_gib * GIB * (1.0 - args.headroom)
    tokens = args.tokens_per_rank or cfg.train.batch_size * cfg.train.seq_len
    rows = []
    for ep, zero, opt in itertools.product([e for e in range(1, world + 1) if world % e == 0],
                                           mm.ZERO_STAGES, mm.TABLE_OPTIMIZERS):
        s = mm.Setup(m, ep=ep, world_size=world, dtype=args.dtype, table_dtype=args.table_dtype,
                     table_optimizer=opt, zero_stage=zero, strategy=args.strategy,
                     table_state_dtype=args.table_state_dtype,
                     tokens_per_rank=tokens)
        row = predict_row(s)
        row["dp"] = world // ep
        row["fits"] = row["total_bytes_per_rank_predicted"] <= budget
        rows.append(row)
    rows.sort(key=lambda r: (OPTIMIZER_RANK[r["table_optimizer"]], r["ep"] > args.gpus_per_node,
                             r["ep"], r["zero_stage"] == 3, r["total_bytes_per_rank_predicted"]))
    return rows


def cmd_plan(args: argparse.Namespace) -> None:
    rows = plan_rows(args)
    fit = [r for r in rows if r["fits"]]
    keys = ["ep", "dp", "zero_stage", "table_optimizer", "expert_params", "expert_optim",
            "expert_grads", "dense", "activations", "a2a", "total_bytes_per_rank_predicted"]
    if args.json:
        emit(fit[:args.top], list(fit[0]) if fit else [], True)
        return
    r0 = rows[0]
    print(f"cluster: {args.nodes} x {args.gpus_per_node} GPUs, {args.gpu_mem_gib:g} GiB each "
          f"({100 * (1 - args.headroom):.0f}% usable); model: N={r0['num_experts']}, "
          f"d={r0['dim']}, {r0['layers']} PEER layers, {args.dtype}, {args.strategy}")
    if not fit:
        smallest = min(rows, key=lambda r: r["total_bytes_per_rank_predicted"])
        print(f"nothing fits: the smallest setting needs "
              f"{human(smallest['total_bytes_per_rank_predicted'])} per rank "
              f"(ep={smallest['ep']}, zero={smallest['zero_stage']}, "
              f"{smallest['table_optimizer']})")
        return
    print(f"{len(fit)} of {len(rows)} settings fit; best first:")
    print(markdown(fit[:args.top], keys), end="")


# --------------------------------------------------------------------------- measure

MEASURE_KEYS = ("expert_bytes_per_rank_predicted", "expert_bytes_per_rank_measured",
                "expert_rel_err", "total_bytes_per_rank_predicted", "peak_bytes_per_rank",
                "peak_over_runtime_bytes", "step_s", "a2a_bytes_moved_predicted",
                "bytes_moved_per_step")


def trainer_overrides(s: mm.Setup, args: argparse.Namespace, run_dir: Path, data: Path
                      ) -> list[str]:
    """Dotted overrides that make peer-train run point `s` for a few steps, quietly."""
    m = s.model
    out = list(args.set) + [
        f"model.dim={m.dim}", f"model.n_layers={m.n_layers}", f"model.peer_blocks={m.peer_blocks}",
        f"model.peer.num_experts={m.peer.num_experts}", f"parallel.ep={s.ep}",
        f"parallel.strategy={s.strategy}", f"optim.table_optimizer={s.table_optimizer}",
        f"optim.table_state_dtype={s.table_state_dtype}",
        f"train.zero_stage={s.zero_stage}", f"train.dtype={s.dtype}",
        f"train.steps={args.steps}", "train.log_every=1", f"train.eval_every={args.steps + 1}",
        f"train.run_dir={run_dir}", "train.resume=never", "train.eval_batches=1",
        f"data.path={data}", f"data.max_bytes={args.data_bytes}",
    ]
    if args.tokens_per_rank:
        cfg = base_config(args)
        out.append(f"train.batch_size={max(1, args.tokens_per_rank // cfg.train.seq_len)}")
    return out


def trainer_argv(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    return (["--config", args.config] if args.config else []) + overrides


def run_point(s: mm.Setup, args: argparse.Namespace, work: Path, data: Path) -> dict:
    """One torchrun launch of peer-train; returns what it measured (see read_run)."""
    name = f"n{s.n}_d{s.d}_L{s.layers}_ep{s.ep}_w{s.world_size}_{s.strategy}_{s.table_optimizer}"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={s.world_size}", "-m", "peer_dist.train",
           *trainer_argv(args, trainer_overrides(s, args, run_dir, data))]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"peer-scale measure: the run {name} failed (exit {proc.returncode}):"
                         f"\n{tail}")
    out = read_run(run_dir)
    out["wall_s"] = time.perf_counter() - t0
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def read_run(run_dir: Path) -> dict:
    """What peer-train measured: summary.json (per-rank expert bytes = local shard tensors plus
    their optimizer state, per-rank peak RSS) and metrics.jsonl (step seconds, all-to-all bytes
    sent per layer and step, CUDA allocator peaks per rank). The largest rank decides memory."""
    mib = 2 ** 20
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    steps = [r["step_seconds"] for r in train if "step_seconds" in r][1:]  # skip warm-up step
    sent = [sum(v for k, v in r.items() if k.startswith("comm/") and k.endswith("/bytes_sent"))
            for r in train if any(k.startswith("comm/") for k in r)]
    last = next((r for r in reversed(train) if any(k.startswith("memory/") for k in r)), {})
    cuda = [v for k, v in last.items() if k.endswith("/cuda_peak_allocated_mib")]
    # peak RSS only grows: its value at the last logged step is the peak over the training
    # steps; the summary's also covers the final evaluation and checkpoint.
    rss_train = [v for k, v in last.items() if k.endswith("/peak_rss_mib")]
    rss_run = max(summary["peak_rss_mib_per_rank"]) * mib
    peak = max(cuda) if cuda else max(rss_train) if rss_train else rss_run / mib
    return {"expert_bytes_per_rank_measured": round(max(summary["expert_mib_per_rank"]) * mib),
            "peak_bytes_per_rank": round(peak * mib),
            "peak_source": "cuda_max_allocated" if cuda else "peak_rss",
            "run_peak_rss_bytes_per_rank": round(rss_run),
            "step_s": statistics.median(steps) if steps else None,
            "bytes_moved_per_step": statistics.median(sent) if sent else None}


def runtime_rss_bytes() -> int:
    """Peak RSS of a rank that has only imported the trainer (python, torch, deepspeed): the
    part of peak RSS that the memory model does not count."""
    code = ("import peer_dist.train.loop, deepspeed; "
            "from peer_dist.train.metrics import peak_rss_bytes; print(peak_rss_bytes())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout.split()[-1])


def cmd_measure(args: argparse.Namespace) -> None:
    if args.table_dtype != "fp32":
        raise SystemExit("peer-scale measure: --table-dtype=bf16 is invalid: the trainer keeps "
                         "the shards in fp32 (allowed: fp32); use predict for what-if studies")
    points = grid(args)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="peer-scale-"))
    data = Path(args.data) if args.data else out / "data"
    base_rss = runtime_rss_bytes()
    rows = []
    for s in points:
        row = predict_row(s)
        row.update(run_point(s, args, out / "runs", data))
        meas = row["expert_bytes_per_rank_measured"]
        row["expert_rel_err"] = (row["expert_bytes_per_rank_predicted"] - meas) / meas
        row["runtime_rss_bytes"] = base_rss
        # peak RSS less the runtime's own, against the predicted total (a rough check)
        row["peak_over_runtime_bytes"] = row["peak_bytes_per_rank"] - (
            base_rss if row["peak_source"] == "peak_rss" else 0)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    keys = list(SETUP_KEYS) + list(MEASURE_KEYS)
    write_outputs(rows, keys, out, "measure",
                  [("expert_bytes_per_rank_predicted", "line"),
                   ("expert_bytes_per_rank_measured", "points"), ("peak_bytes_per_rank", "cross")])
    if not args.json:
        print(markdown(rows, shown_keys(rows, keys)), end="")


# --------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "predict":
        cmd_predict(args)
    elif args.command == "plan":
        cmd_plan(args)
    elif args.command == "measure":
        cmd_measure(args)


if __name__ == "__main__":
    main()
