"""What a run keeps and what it says when it resumes: the global batch, the LR schedule, and
one line for each thing that differs from the checkpoint.

Global batch: `train.global_batch_size` fixes the sequences per optimizer step; the
accumulation steps follow from it, the world size and the per-rank micro-batch. Since rank r
of world W reads samples [(g*W + r)*B, (g*W + r + 1)*B) for global micro-batch g, a step
reads samples [s*G*W*B, (s+1)*G*W*B): the same sequences at any world size when G*W*B is.

Schedule: warmup then cosine to `min_lr_ratio`, as one segment `Schedule(start, start_ratio,
total)`: from step `start`, where the LR is base * start_ratio, down to base * min_ratio at
`total`. A run starts with (warmup, 1.0, train.steps). Resumed with another `train.steps`
(`optim.resume_schedule=continue`, the default), the segment starts again at the resumed
step from the LR it had, so raising train.steps to continue a finished run never sends the
LR back up. The segment is saved in each checkpoint's meta.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peer_dist.cli import plural
from peer_dist.config import Config, to_dict
from peer_dist.errors import UserError
from peer_dist.train.startup import config_diff

if TYPE_CHECKING:
    from peer_dist.parallel import Topology


def resolve_batch(cfg: Config, world: int) -> str | None:
    """With train.global_batch_size set, derive train.grad_accum (in place) or refuse in one
    line; `world` is the number of ranks. Returns a line when a train.grad_accum other than 1
    was given and is replaced."""
    t = cfg.train
    if not t.global_batch_size:
        return None
    per_step = world * t.batch_size
    if t.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size={t.global_batch_size} cannot be split over "
                        f"{plural(world, 'rank')} with train.batch_size={t.batch_size}: "
                        "allowed are "
                        f"multiples of {per_step} (ranks x batch_size), or a train.batch_size "
                        "that divides global_batch_size / ranks", all_ranks=True)
    given, t.grad_accum = t.grad_accum, t.global_batch_size // per_step
    if given in (1, t.grad_accum):
        return None
    return (f"peer-train: train.grad_accum={given} replaced by {t.grad_accum}: "
            f"train.global_batch_size={t.global_batch_size} sets it ({plural(world, 'rank')} x "
            f"train.batch_size={t.batch_size} x {t.grad_accum})")


def global_batch(cfg: Config, world: int) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * world


@dataclass
class Schedule:
    start: int  # the step the cosine segment starts at
    start_ratio: float  # LR / base LR there
    total: int  # the step it reaches min_lr_ratio at

    @classmethod
    def fresh(cls, cfg: Config) -> Schedule:
        return cls(cfg.optim.warmup_steps, 1.0, cfg.train.steps)

    def ratio(self, step: int, warmup: int, min_ratio: float) -> float:
        """LR / base LR at `step` (0-based)."""
        if step < min(warmup, self.start):
            return (step + 1) / warmup
        progress = min(1.0, (step - self.start) / max(1, self.total - self.start))
        return min_ratio + (self.start_ratio - min_ratio) * 0.5 * (1 + math.cos(math.pi *
                                                                                 progress))


def on_resume(path: Path, step: int, cfg: Config, topo: Topology) -> tuple[Schedule, list[str]]:
    """The schedule to continue with, and one line per thing that changed since checkpoint
    `path` (of step `step`) was written."""
    import yaml

    meta = json.loads((path / "meta.json").read_text())
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    st = saved.get("train", {})
    o = cfg.optim
    old = Schedule(**meta["lr_schedule"]) if "lr_schedule" in meta else Schedule(
        o.warmup_steps, 1.0, int(st.get("steps", cfg.train.steps)))
    notes = []
    tables = cfg.model.has_expert_tables()
    moved = [f"world size {meta['world_size']} -> {topo.world_size}"] * (
        meta["world_size"] != topo.world_size)
    if tables and meta["ep"] != topo.ep:
        moved.append(f"the tables were resharded from EP {meta['ep']} to EP {topo.ep}")
    elif tables and moved:
        moved.append(f"the tables keep their EP {topo.ep} shards")
    if moved:
        notes.append(": ".join(moved))
    old_batch = meta.get("global_batch") or int(st.get("batch_size", 0)) * int(
        st.get("grad_accum", 1)) * meta["world_size"]
    new_batch = global_batch(cfg, topo.world_size)
    if old_batch and old_batch != new_batch:
        notes.append(f"global batch {old_batch} -> {new_batch} sequences a step (set "
                     f"train.global_batch_size={old_batch} to keep it at any world size)")
    schedule = old
    if step >= cfg.train.steps and cfg.train.steps != old.total:  # no LR of the new length runs
        notes.append(f"train.steps {old.total} -> {cfg.train.steps}: the checkpoint is at step "
                     f"{step}, at or past it: nothing to train (evaluated, and saved as it is)")
    elif cfg.train.steps != old.total:
        lr_now = o.lr * old.ratio(step, o.warmup_steps, o.min_lr_ratio)
        if o.resume_schedule == "recompute" or step < o.warmup_steps:
            schedule = Schedule.fresh(cfg)
            how = "the schedule of the new length from here"
        else:
            schedule = Schedule(step, lr_now / o.lr, cfg.train.steps)
            how = f"the LR goes on from {lr_now:.3g} down to {o.lr * o.min_lr_ratio:.3g}"
        lr_next = o.lr * schedule.ratio(step, o.warmup_steps, o.min_lr_ratio)
        notes.append(f"train.steps {old.total} -> {cfg.train.steps}: {how} (lr at step "
                     f"{step + 1}: {lr_next:.3g}; optim.resume_schedule={o.resume_schedule})")
    now = json.loads(json.dumps(to_dict(cfg)))  # tuples as YAML reads them back: lists
    derived = ("train.grad_accum",) if cfg.train.global_batch_size else ()  # resolve_batch's
    changed = [(k, a, b) for k, a, b in config_diff(saved, now)
               if saved and k not in (*NOTED, *derived) and k != "train.steps"]
    if changed:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        notes.append(f"changed since the checkpoint, taken as given now: {shown}{more}")
    return schedule, [f"peer-train: resume: {n}" for n in notes]


# what a resume may change without a word: where the run is, and how it was resumed
NOTED = ("train.run_dir", "train.resume")


def meta(schedule: Schedule, cfg: Config, world: int) -> dict:
    """What a checkpoint's meta.json keeps of these."""
    return {"lr_schedule": asdict(schedule), "global_batch": global_batch(cfg, world)}
