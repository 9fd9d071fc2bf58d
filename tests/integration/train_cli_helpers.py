"""Helpers for the integration tier: run the real CLI (peer-train, torchrun) on CPU.

Every launch pays for Python + torch + DeepSpeed start-up (several seconds), so runs that
several tests read are made once per session and cached by their arguments.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
TIMEOUT = 240


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
             CUDA_VISIBLE_DEVICES="")
    return e


def free_port() -> int:
    """A free port below the ephemeral range. A port from bind(0) is one the system may hand
    to any other process (a client's connection) between this check and the launcher's bind,
    and a rendezvous that finds its port taken connects to the stranger and hangs; ports
    below the range are only ever taken by explicit binds."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    rng = random.Random()  # not the tests' seeded global generator
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low - 12000}, {low})")


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "peer_dist.train"]


def peer_train() -> list[str]:
    """The installed console script (falls back to the module when not on PATH)."""
    exe = Path(sys.executable).with_name("peer-train")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "peer_dist.train"]


def check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(proc.args)}\n"
                             f"--- output (tail) ---\n{proc.stdout[-6000:]}")


def run_cli(cmd: list[str], run_dir: Path, overrides: list[str], data_dir: Path,
            timeout: int = TIMEOUT) -> dict:
    """Run a training command; returns {"losses": {step: loss}, "summary": ..., "log": ...}."""
    args = [*cmd, "--config", str(TINY), f"train.run_dir={run_dir}",
            f"data.path={data_dir}", *overrides]
    proc = subprocess.run(args, cwd=ROOT, env=env(), capture_output=False, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    check(proc)
    return read_run(run_dir, proc.stdout)


def read_run(run_dir: Path, log: str = "") -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["kind"] == "train" and "loss" in r}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"losses": losses, "summary": summary, "log": log, "rows": rows}


class Runs:
    """Session cache of CLI runs keyed by (launcher, overrides)."""

    def __init__(self, base: Path):
        self.base, self.data, self.cache = base, base / "data", {}

    def get(self, nproc: int, *overrides: str) -> dict:
        key = (nproc, overrides)
        if key not in self.cache:
            run_dir = self.base / f"run{len(self.cache)}"
            cmd = peer_train() if nproc == 1 else torchrun(nproc)
            self.cache[key] = {**run_cli(cmd, run_dir, list(overrides), self.data),
                               "run_dir": run_dir}
        return self.cache[key]
