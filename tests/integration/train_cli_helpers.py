"""Helpers for the integration tier: run the real CLI (peer-train, torchrun) on CPU, or the
rank side of peer-train (what torchrun's workers run) on ranks forked from the session's warm
server (tests/forkranks.py) where the launcher is not what a test is about.

A CLI launch pays for Python + torch + DeepSpeed start-up in every process (~5 s for two
ranks), the forked ranks do not (~1.3 s); runs that several tests read are made once per
session and cached by their arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import forkranks
from forkranks import free_port  # noqa: F401 (the tests' import of it)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
TIMEOUT = 240


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
             CUDA_VISIBLE_DEVICES="")
    return e


def peer_train() -> list[str]:
    """The installed console script (falls back to the module when not on PATH)."""
    exe = Path(sys.executable).with_name("peer-train")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "peer_dist.train"]


def check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(proc.args)}\n"
                             f"--- output (tail) ---\n{proc.stdout[-6000:]}")


def run_ranks(nproc: int, run_dir: Path, overrides: list[str], data_dir: Path,
              timeout: int = TIMEOUT, config: Path = TINY, rank_overrides: tuple = (),
              while_running=None, **environ: str) -> subprocess.CompletedProcess:
    """`python -m peer_dist.train --config CONFIG ...` on nproc ranks with torchrun's
    environment (one rank: none, as peer-train without --nproc), rank r with
    rank_overrides[r] added when given, while_running(processes, log) called once they run;
    the ranks' output and the job's exit code (the highest rank's, a killed rank's
    128 + signal) as a CompletedProcess."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    log.unlink(missing_ok=True)
    args = ["--config", str(config), f"train.run_dir={run_dir}", f"data.path={data_dir}",
            *overrides]
    if rank_overrides:
        args = [[*args, *extra] for extra in rank_overrides]
    e = env()
    e.pop("PEER_DEBUG", None)
    watch = None if while_running is None else (lambda procs: while_running(procs, log))
    code = forkranks.train(nproc, args, log, {**e, **environ}, timeout, watch)
    return subprocess.CompletedProcess(args, code, log.read_text() if log.exists() else "")


def train_ranks(nproc: int, run_dir: Path, overrides: list[str], data_dir: Path) -> dict:
    """run_ranks() that must succeed: {"losses": {step: loss}, "summary", "log", "rows"}."""
    proc = run_ranks(nproc, run_dir, overrides, data_dir)
    check(proc)
    return read_run(run_dir, proc.stdout)


def read_run(run_dir: Path, log: str = "") -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["kind"] == "train" and "loss" in r}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"losses": losses, "summary": summary, "log": log, "rows": rows}


class Runs:
    """Session cache of training runs on forked ranks, keyed by (ranks, overrides)."""

    def __init__(self, base: Path):
        self.base, self.data, self.cache = base, base / "data", {}

    def get(self, nproc: int, *overrides: str) -> dict:
        key = (nproc, overrides)
        if key not in self.cache:
            run_dir = self.base / f"run{len(self.cache)}"
            self.cache[key] = {**train_ranks(nproc, run_dir, list(overrides), self.data),
                               "run_dir": run_dir}
        return self.cache[key]
