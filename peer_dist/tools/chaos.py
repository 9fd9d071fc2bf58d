"""peer-chaos: train under injected faults and check that nothing was lost.

    peer-chaos --config configs/tiny.yaml --nproc 2 --faults 20        # the soak
    peer-chaos --faults 4 --json                                       # a short one
    peer-chaos --faults 20 --seed 1 --reference runs/chaos/reference   # same reference

First an uninterrupted reference run (or --reference: one made before with the same settings,
checked: steps, world size, config), then the same steps under `peer-train --nproc N
--max-restarts ...` while a driver injects faults at random steps (seeded), one after another:

  kill_rank      SIGKILL of a random rank mid-run: torchrun restarts the ranks, they resume
  kill_in_ckpt   a rank SIGKILLed while a checkpoint is being written (PEER_FAULT): the
                 half-written one is never resumed from
  preempt        SIGTERM to the whole job: the ranks save and exit 75; the driver relaunches
  damage         SIGTERM, then a byte of the checkpoint it saved flipped: the relaunch falls
                 back to the checkpoint before, with one warning

At the end every tensor of the final checkpoint (weights, tables, both optimizers' state) must
equal the reference's bit for bit. It prints each fault, how many steps it cost (steps redone:
the step reached minus the step resumed from), and the verdict; `--json` ends with one object.
Exit status 0 when every fault was survived and the states are equal, 1 otherwise (2: a
reference that does not match, in one line).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from peer_dist import cli
from peer_dist.config import ConfigError, load_config, to_dict
from peer_dist.data.prepare import prepared_mismatch
from peer_dist.errors import folder_error
from peer_dist.tools.export import quiet_env
from peer_dist.train import checkpoint as ckpt
from peer_dist.train.preempt import EXIT_INTERRUPTED
from peer_dist.train.startup import config_diff, local_ranks_error

KINDS = ("kill_rank", "kill_in_ckpt", "preempt", "damage")
STEP = re.compile(r"^step\s+(\d+)/")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")
BANNER = re.compile(r"peer-train: rank 0/\d+: ")  # every start of the ranks


@dataclass
class Fault:
    kind: str
    at_step: int  # the step the run had reached when the fault hit
    resumed_from: int | None = None  # the step the run continued from after it
    seconds: float = 0.0  # from the fault to the resumed run's start line

    @property
    def redone(self) -> int | None:
        return None if self.resumed_from is None else self.at_step - self.resumed_from


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="peer-chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--nproc", type=cli.ints(2), default=2)
    p.add_argument("--faults", type=cli.ints(1, 10_000), default=20,
                   help="faults to inject (each a restart of a few seconds)")
    p.add_argument("--ckpt-every", type=cli.ints(1, 1_000_000), default=5,
                   help="checkpoint interval in steps")
    p.add_argument("--seed", type=cli.ints(0, 2 ** 63 - 1), default=0)
    p.add_argument("--run-dir", default="runs/chaos")
    p.add_argument("--data", default="", help="data.path (default: the config's)")
    p.add_argument("--reference", default="",
                   help="a finished uninterrupted run of the same settings to compare with "
                        "(its run_dir; default: run one first)")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both runs")
    args = p.parse_args(argv)
    problem = local_ranks_error(args.nproc) or _problem(args)
    if problem:
        p.error(problem)
    return args


# the keys both runs get from peer-chaos (run_overrides), and from what
OWN_KEYS = {"train.run_dir": "--run-dir", "train.steps": "(--faults + 2) x 2 x --ckpt-every",
            "train.log_every": "1: every step is compared", "train.ckpt_every": "--ckpt-every",
            "train.keep_last": "3",
            "train.resume": "auto: each restart resumes from the newest checkpoint"}


def _problem(args: argparse.Namespace) -> str | None:
    """What the runs would end in at their start (the run folder, the data folder, the config
    and its overrides), found before the reference run trains; None when they can start."""
    problem = folder_error(args.run_dir)
    if problem:
        return (f"--run-dir={args.run_dir!r} is invalid: {problem}; allowed is a folder, new or "
                "existing, that can be written")
    own = cli.own_override(args.overrides, OWN_KEYS)
    if own:
        return (f"override {own[0]!r} is invalid: peer-chaos sets {own[1]} itself (from "
                f"{OWN_KEYS[own[1]]}): allowed are the other keys")
    if args.data and Path(args.data).exists() and not Path(args.data).is_dir():
        return f"--data={args.data!r} is a file: allowed is a prepared data folder"
    try:
        cfg = load_config(args.config, run_overrides(args, Path(args.run_dir) / "reference", 1))
        if (Path(cfg.data.path) / "meta.json").is_file():
            return prepared_mismatch(cfg.data)
    except ConfigError as e:
        return str(e)
    except (OSError, ValueError, AttributeError, TypeError):  # a bad meta.json: the run says
        pass
    return None


def run_overrides(args: argparse.Namespace, run_dir: Path, steps: int) -> list[str]:
    """The overrides of both runs (the reference's and the chaos run's)."""
    data = [f"data.path={args.data}"] if args.data else []
    if args.data and (Path(args.data) / "meta.json").is_file():
        data.append("data.source=")  # a prepared folder named: trained on as it is
    return [f"train.run_dir={run_dir}", f"train.steps={steps}", "train.log_every=1",
            f"train.ckpt_every={args.ckpt_every}", "train.keep_last=3", "train.resume=auto",
            *data, *args.overrides]


def train_cmd(args: argparse.Namespace, run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "peer_dist.train", "--nproc", str(args.nproc),
            "--max-restarts", str(args.faults + 1), "--config", args.config,
            *run_overrides(args, run_dir, steps)]


def reference_problem(args: argparse.Namespace, ref: Path, steps: int) -> str | None:
    """Why the run in `ref` cannot be this chaos run's reference (None: it can): it must have
    finished the same number of steps at the same world size with the same config."""
    final = ref / "checkpoints" / ckpt.step_name(steps)
    if not (ref / "summary.json").is_file() or not final.is_dir():
        return (f"--reference {ref}: no finished run of {steps} steps there (allowed: the "
                f"run_dir of a run that wrote {final.relative_to(ref)})")
    world = json.loads((ref / "summary.json").read_text()).get("world_size")
    if world != args.nproc:
        return f"--reference {ref}: it ran on {world} ranks, this run on --nproc {args.nproc}"
    try:
        want = to_dict(load_config(args.config, run_overrides(args, ref, steps)))
        have = to_dict(load_config(ref / "config.yaml"))
    except ConfigError as e:
        return f"--reference {ref}: {e}"
    # not what trains: where, whether it resumes, what prepared the data folder named
    diff = [d for d in config_diff(want, have)
            if d[0] not in ("train.run_dir", "train.resume", "data.source")]
    if diff:
        shown = ", ".join(f"{k}={b!r} there vs {a!r} here" for k, a, b in diff[:3])
        return f"--reference {ref}: another config ({shown})"
    return None


def run_env(fault: str = "") -> dict[str, str]:
    # a fresh rendezvous store for every restart (the shared one can hand restarted ranks
    # the dead attempt's addresses)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("PEER_FAULT", None)
    if fault:
        env["PEER_FAULT"] = fault
    return env


def rank_pids(launcher: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def damage_newest(run_dir: Path) -> str:
    root = run_dir / "checkpoints"
    newest = sorted(root.glob("step_*"), key=ckpt.step_of)[-1]
    # a table shard, else (a model without PEER tables: empty shards) the dense weights
    files = [f for f in sorted((newest / "tables").glob("*.distcp")) if f.stat().st_size]
    target = (files or [newest / "dense_full.pt"])[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return str(target.relative_to(newest.parent))


class Driver:
    """Runs the chaos run to its end, injecting `plan` in order."""

    def __init__(self, args: argparse.Namespace, run_dir: Path, steps: int, plan: list[str],
                 rng: random.Random):
        self.args, self.run_dir, self.steps, self.rng = args, run_dir, steps, rng
        self.plan, self.faults, self.step, self.log = list(plan), [], 0, []
        self.pending: list[Fault] = []  # planned or injected, not yet resumed from

    def say(self, line: str) -> None:
        print(f"peer-chaos: {line}", flush=True)

    def next_trigger(self) -> int:
        return min(self.steps - 1, self.step + self.rng.randint(1, 2 * self.args.ckpt_every))

    def run(self) -> None:
        while True:
            kind = self.plan[0] if self.plan else None
            fault_env = ""
            if kind == "kill_in_ckpt":  # the next checkpoint after a step or more of training
                k = self.args.ckpt_every
                at = min((self.step // k + 2) * k, (self.steps - 1) // k * k)
                rank = self.rng.randrange(self.args.nproc)
                fault_env = f"kill_in_ckpt@{rank}:{at}"
                self.plan.pop(0)
                self.pending.append(Fault("kill_in_ckpt", at))  # fires when it is written
            code = self.launch(fault_env)
            if code == 0:
                return
            if code != EXIT_INTERRUPTED:
                raise RuntimeError(f"the run failed with status {code}:\n"
                                   + "".join(self.log[-40:]))

    def launch(self, fault_env: str) -> int:
        """One peer-train job until it exits; kill_rank faults are injected in it (torchrun
        restarts the ranks), preempt and damage end it (status 75)."""
        proc = subprocess.Popen(train_cmd(self.args, self.run_dir, self.steps), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=run_env(fault_env), start_new_session=True)
        trigger, stopping, first = self.next_trigger(), False, len(self.log)
        for line in proc.stdout:
            self.log.append(line)
            if line.startswith("[fault] rank"):
                for f in self.pending:
                    f.seconds = f.seconds or time.monotonic()  # kill_in_ckpt fired
            m = RESUMED.search(line)
            if m or BANNER.match(line):  # resumed, or started over (no checkpoint left)
                self.resolve(int(m.group(1)) if m else 0)
            if not (m := STEP.match(line)):
                continue
            self.step = int(m.group(1))
            kind = self.plan[0] if self.plan else None
            if stopping or self.pending or kind in (None, "kill_in_ckpt") or \
                    self.step < trigger:
                continue
            self.plan.pop(0)
            self.pending.append(Fault(kind, self.step, seconds=time.monotonic()))
            if kind == "kill_rank":
                os.kill(self.rng.choice(rank_pids(proc.pid)), signal.SIGKILL)
                trigger = self.next_trigger()
            else:  # preempt, damage: the whole job, as a scheduler does
                os.killpg(proc.pid, signal.SIGTERM)
                stopping = True
        code = proc.wait()
        if code == EXIT_INTERRUPTED and self.pending:
            stops = re.findall(r"stopped by \w+ at step (\d+)", "".join(self.log[first:]))
            fault = self.pending[-1]
            fault.at_step = int(stops[-1]) if stops else fault.at_step  # where it saved
            if fault.kind == "damage":
                self.say(f"damaged {damage_newest(self.run_dir)}")
        return code

    def resolve(self, resumed: int) -> None:
        """The ranks (re)started from step `resumed`: every fault that fired is survived."""
        for f in [f for f in self.pending if f.seconds > 0]:
            self.pending.remove(f)
            f.resumed_from, f.seconds = resumed, time.monotonic() - f.seconds
            self.faults.append(f)
            self.say(f"fault {len(self.faults)}: {f.kind} at step {f.at_step}, resumed from "
                     f"step {resumed} ({f.redone} steps redone, {f.seconds:.1f} s)")


def compare(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (or exist on one side only)."""
    with warnings.catch_warnings():  # DCP's note that it reads in one process
        warnings.simplefilter("ignore")
        want, have = ckpt.all_tensors(a), ckpt.all_tensors(b)
    return sorted(set(want) ^ set(have)) + [k for k in sorted(set(want) & set(have))
                                            if not torch.equal(want[k], have[k])]


def make_plan(n: int, rng: random.Random) -> list[str]:
    """n faults at random, every kind at least once where n allows. kill_in_ckpt is armed when
    a job starts (PEER_FAULT fires in a job's first attempt), so it comes first or right
    after a fault that ends the job (preempt, damage)."""
    plan: list[str] = []
    while len(plan) < n:
        new_job = not plan or plan[-1] in ("preempt", "damage")
        allowed = [k for k in KINDS if k != "kill_in_ckpt" or new_job]
        unused = [k for k in allowed if k not in plan]
        if "kill_in_ckpt" not in plan and not new_job and n - len(plan) <= 2:
            unused = [k for k in ("preempt", "damage") if k in allowed]  # make room for it
        plan.append(rng.choice(unused or allowed))
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_env()  # DeepSpeed's guess of the accelerator printed a warning on stdout (--json)
    t0 = time.monotonic()
    rng = random.Random(args.seed)
    plan = make_plan(args.faults, rng)
    steps = (args.faults + 2) * 2 * args.ckpt_every  # room for every fault
    root = Path(args.run_dir)
    ref_dir, chaos_dir = root / "reference", root / "chaos"
    for d in ([] if args.reference else [ref_dir]) + [chaos_dir]:
        shutil.rmtree(d, ignore_errors=True)
    if args.reference:
        ref_dir = Path(args.reference)
        problem = reference_problem(args, ref_dir, steps)
        if problem:
            print(f"peer-chaos: {problem}", file=sys.stderr)
            return 2
    print(f"peer-chaos: {args.faults} faults ({', '.join(plan)}) over {steps} steps, "
          f"checkpoint every {args.ckpt_every}; "
          + (f"reference {ref_dir}" if args.reference else "reference run first"), flush=True)
    if not args.reference:
        ref = subprocess.run(train_cmd(args, ref_dir, steps), text=True, env=run_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if ref.returncode != 0:
            print(f"peer-chaos: the reference run failed (status {ref.returncode}):\n"
                  + ref.stdout[-3000:], file=sys.stderr)
            return 1
    driver = Driver(args, chaos_dir, steps, plan, rng)
    try:
        driver.run()
    except RuntimeError as e:
        print(f"peer-chaos: {e}", file=sys.stderr)
        return 1
    final = ckpt.step_name(steps)
    diff = compare(ref_dir / "checkpoints" / final, chaos_dir / "checkpoints" / final)
    survived = [f for f in driver.faults if f.resumed_from is not None]
    redone = max((f.redone for f in survived), default=0)
    ok = not diff and len(survived) == args.faults and redone <= args.ckpt_every
    print(f"peer-chaos: {len(survived)}/{args.faults} faults survived; final state "
          f"{'bit-exact' if not diff else 'DIFFERS: ' + ', '.join(diff[:5])}; at most "
          f"{redone} steps redone per fault (checkpoint interval {args.ckpt_every}); "
          f"{time.monotonic() - t0:.0f} s; verdict {'PASS' if ok else 'FAIL'}", flush=True)
    if args.json:
        injected = len(driver.faults) + sum(f.seconds > 0 for f in driver.pending)
        print(json.dumps({"faults_injected": injected,
                          "faults_survived": len(survived), "bit_exact": not diff,
                          "max_steps_redone": redone, "checkpoint_interval": args.ckpt_every,
                          "steps": steps, "seconds": round(time.monotonic() - t0, 1),
                          "faults": [asdict(f) | {"redone": f.redone} for f in driver.faults]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
