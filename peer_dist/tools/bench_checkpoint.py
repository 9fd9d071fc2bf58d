"""peer-bench checkpoint: how long training stops for a checkpoint, in the foreground and in
the background (train.checkpoint_async), side by side in one run.

    peer-bench checkpoint --config configs/million_cpu.yaml --nproc 2

Trains the config twice for --steps steps with a checkpoint every --every steps (and at the
end), once per mode, and reads each checkpoint's pause (training stopped) and whole write
time from metrics.jsonl. The pause includes any wait for the save before it (shown apart).
The ratio column is the mean pause over the mean foreground write: the share of the
synchronous save that training still waits for.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from peer_dist import cli

MODES = (("foreground", "false"), ("background", "true"))
# the config keys each run sets itself, and the flag that sets them
OWN = {"train.run_dir": "--run-dir", "train.steps": "--steps", "train.ckpt_every": "--every",
       "train.resume": "", "train.keep_last": "", "train.checkpoint_async": ""}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="peer-bench checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/million_cpu.yaml")
    p.add_argument("--nproc", type=cli.ints(1, cli.MAX_COUNT), default=2,
                   help="ranks of each training run (on this machine)")
    p.add_argument("--steps", type=cli.ints(1, cli.MAX_COUNT), default=80)
    p.add_argument("--every", type=cli.ints(1, cli.MAX_COUNT), default=40,
                   help="checkpoint interval in steps, <= --steps (long enough for a background "
                        "write to finish before the next: else the wait shows in the wait "
                        "column)")
    p.add_argument("--run-dir", default="runs/bench_checkpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both runs")
    args = p.parse_args(argv)
    if args.every > args.steps:
        p.error(f"--every={args.every} with --steps={args.steps} is invalid: allowed is "
                "1 <= --every <= --steps (a checkpoint inside the run)")
    problem = _problem(args)
    if problem:
        p.error(problem)
    return args


def _overrides(args: argparse.Namespace, name: str, flag: str) -> list[str]:
    """The config overrides of one mode's training run (the user's last: they win)."""
    return [f"train.run_dir={Path(args.run_dir) / name}", "train.resume=never",
            f"train.steps={args.steps}", f"train.ckpt_every={args.every}", "train.keep_last=1",
            f"train.checkpoint_async={flag}", *args.overrides]


def _problem(args: argparse.Namespace) -> str | None:
    """The one-line error the training runs would end in at their start (the config and its
    overrides, ranks this machine cannot run), found before either starts; None when both can."""
    from peer_dist.errors import UserError, folder_error
    from peer_dist.train.startup import local_ranks_error

    problem = folder_error(args.run_dir)
    if problem:
        return (f"--run-dir={args.run_dir!r} is invalid: {problem}; allowed is a folder, new "
                "or existing, that can be written")
    own = cli.own_override(args.overrides, OWN)
    if own:
        item, key = own
        return (f"override {item!r} is invalid here: peer-bench checkpoint sets {key} "
                f"itself{f' (allowed: {OWN[key]})' if OWN[key] else ''}")
    too_many = local_ranks_error(args.nproc, "--nproc")
    if too_many:
        return too_many
    try:
        from peer_dist.config import load_config

        for name, flag in MODES:
            load_config(args.config, _overrides(args, name, flag))
    except UserError as e:
        return str(e)
    return None


def run_mode(args: argparse.Namespace, name: str, flag: str) -> list[dict]:
    run_dir = Path(args.run_dir) / name
    cmd = [sys.executable, "-m", "peer_dist.train", "--nproc", str(args.nproc), "--config",
           args.config, *_overrides(args, name, flag)]
    print(f"peer-bench checkpoint: {name}: {' '.join(cmd[1:])}", flush=True,
          file=sys.stderr if args.json else sys.stdout)  # --json: stdout is the JSON alone
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"peer-bench checkpoint: the {name} run failed (status "
                         f"{proc.returncode}):\n{proc.stdout[-3000:]}")
    try:
        text = (run_dir / "metrics.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit(f"peer-bench checkpoint: the {name} run's metrics cannot be read: "
                         f"{e}") from None
    rows = [r for r in rows if isinstance(r, dict) and r.get("kind") == "checkpoint"]
    if not rows:
        raise SystemExit(f"peer-bench checkpoint: the {name} run wrote no checkpoint rows to "
                         f"{run_dir / 'metrics.jsonl'}")
    return rows


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {name: run_mode(args, name, flag) for name, flag in MODES}
    sync_write = mean(results["foreground"], "checkpoint_write_s")
    table = sys.stderr if args.json else sys.stdout
    print(f"\n{'mode':<11} {'checkpoints':>11} {'pause s':>9} {'of it waiting':>14} "
          f"{'write s':>9} {'pause / foreground write':>25}", file=table)
    out = []
    for name, rows in results.items():
        pause, write = mean(rows, "checkpoint_pause_s"), mean(rows, "checkpoint_write_s")
        wait, ratio = mean(rows, "checkpoint_wait_s"), pause / sync_write
        print(f"{name:<11} {len(rows):>11} {pause:>9.3f} {wait:>14.3f} {write:>9.3f} "
              f"{ratio:>25.3f}", file=table)
        out.append({"mode": name, "checkpoints": len(rows), "pause_s": pause, "wait_s": wait,
                    "write_s": write, "pause_over_foreground_write": ratio,
                    "config": args.config, "nproc": args.nproc})
    if args.json:
        print(json.dumps(out))
