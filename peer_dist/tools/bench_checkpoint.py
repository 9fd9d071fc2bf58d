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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="peer-bench checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/million_cpu.yaml")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--every", type=int, default=40,
                   help="checkpoint interval in steps (long enough for a background write to "
                        "finish before the next: else the wait shows in the wait column)")
    p.add_argument("--run-dir", default="runs/bench_checkpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both runs")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.steps < 1 or not 1 <= args.every <= args.steps:
        p.error(f"--nproc={args.nproc} --steps={args.steps} --every={args.every}: allowed are "
                "--nproc >= 1, --steps >= 1, 1 <= --every <= --steps")
    return args


def run_mode(args: argparse.Namespace, name: str, flag: str) -> list[dict]:
    run_dir = Path(args.run_dir) / name
    cmd = [sys.executable, "-m", "peer_dist.train", "--nproc", str(args.nproc), "--config",
           args.config, f"train.run_dir={run_dir}", "train.resume=never",
           f"train.steps={args.steps}", f"train.ckpt_every={args.every}", "train.keep_last=1",
           f"train.checkpoint_async={flag}", *args.overrides]
    print(f"peer-bench checkpoint: {name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"peer-bench checkpoint: the {name} run failed (status "
                         f"{proc.returncode}):\n{proc.stdout[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "checkpoint"]


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {name: run_mode(args, name, flag) for name, flag in MODES}
    sync_write = mean(results["foreground"], "checkpoint_write_s")
    print(f"\n{'mode':<11} {'checkpoints':>11} {'pause s':>9} {'of it waiting':>14} "
          f"{'write s':>9} {'pause / foreground write':>25}")
    out = []
    for name, rows in results.items():
        pause, write = mean(rows, "checkpoint_pause_s"), mean(rows, "checkpoint_write_s")
        wait, ratio = mean(rows, "checkpoint_wait_s"), pause / sync_write
        print(f"{name:<11} {len(rows):>11} {pause:>9.3f} {wait:>14.3f} {write:>9.3f} "
              f"{ratio:>25.3f}")
        out.append({"mode": name, "checkpoints": len(rows), "pause_s": pause, "wait_s": wait,
                    "write_s": write, "pause_over_foreground_write": ratio,
                    "config": args.config, "nproc": args.nproc})
    if args.json:
        print(json.dumps(out))
