"""Logging: TensorBoard scalars and a console progress line (rank 0), a JSON-lines metrics file
(rank 0, used by tests and plots), per-rank memory, and the end-of-run summary."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from peer_dist.cli import plural


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def expert_memory_bytes(shards: list, table_opt: Any) -> int:
    """Bytes of this rank's table shards plus their optimizer state."""
    total = 0
    for shard in shards:
        for p in (shard.u, shard.v):
            total += tensor_bytes([p])
            total += tensor_bytes([v for v in table_opt.init_state(p).values()
                                   if torch.is_tensor(v)])
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    VmHWM belongs to this process's own address space. ru_maxrss is not enough: Linux carries it
    across exec, so a process started by a larger one (a benchmark row, a torchrun worker) would
    report its parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def memory_stats(device: torch.device) -> dict[str, float]:
    """This rank's memory in MiB: peak RSS of the process, and CUDA allocator peaks on GPU."""
    mib = 1024 ** 2
    stats = {"peak_rss_mib": peak_rss_bytes() / mib}
    if device.type == "cuda":
        stats["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / mib
        stats["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / mib
        stats["cuda_reserved_mib"] = torch.cuda.memory_reserved(device) / mib
    return stats


def gather_objects(obj: Any) -> list[Any]:
    """obj from every rank, in rank order (on every rank)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def keep_history(path: Path, start_step: int, redo_final: bool) -> None:
    """Keep the rows of metrics.jsonl up to the step a run resumes from (the steps after it are
    trained again; a half-written last line is dropped). A run that resumes at its last step
    evaluates again: its validation rows at that step go too. Rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if step < start_step or (step == start_step and not (redo_final and row.get("kind")
                                                               == "val")):
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class Logger:
    """Rank 0 writes TensorBoard, metrics.jsonl and the console; other ranks do nothing."""

    def __init__(self, run_dir: str | Path, rank: int, total_steps: int, start_step: int):
        self.rank, self.total, self.start_step = rank, total_steps, start_step
        self.log_dir = Path(run_dir) / "tb"
        self.t0 = time.perf_counter()
        self.writer = None
        self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(run_dir) / "metrics.jsonl"
            keep_history(path, start_step, redo_final=start_step >= total_steps)
            # purge_step: TensorBoard hides the events a resumed run writes again (steps after
            # the checkpoint), so every step appears once.
            self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1)
            self.jsonl = open(path, "a")  # noqa: SIM115
        # The last row written and where it starts: more values of the same (kind, step)
        # rewrite it, so each step has one row per kind.
        self._last: tuple[str, int, dict, int] | None = None

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if self.rank != 0:
            return
        for key, value in values.items():
            self.writer.add_scalar(key if "/" in key else f"{kind}/{key}", value, step)
        row = {"kind": kind, "step": step, **values}
        if self._last is not None and self._last[:2] == (kind, step):
            row = {**self._last[2], **values}
            self.jsonl.truncate(self._last[3])  # append mode: the next write lands at the end
        start = self.jsonl.tell()
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self._last = (kind, step, row, start)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """One console line: step, loss, perplexity, lr, grad norm, tokens/s, ETA."""
        if self.rank != 0:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("inf")
        line = (f"step {step:>6d}/{self.total} | loss {values['loss']:.4f} | "
                f"ppl {math.exp(min(values['loss'], 50)):.2f} | lr {values['lr']:.2e} | "
                f"gnorm {values['grad_norm']:.3f} | {fmt_count(values['tokens_per_s'])} tok/s | "
                f"ETA {fmt_duration(eta)}")
        if values.get("skipped_total"):
            line += f" | skipped {int(values['skipped_total'])}"
        print(line, flush=True)

    def text(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The end-of-run summary as console lines."""
    lines = ["", "=== summary ===",
             f"steps            {summary['steps']} ({plural(summary['world_size'], 'rank')}, ZeRO "
             f"{summary['zero_stage']}, {summary['dtype']})",
             f"final loss       {summary['final_loss']:.4f} (train, last step)"
             if math.isfinite(summary["final_loss"]) else
             "final loss       n/a (no step run: the checkpoint was at or past train.steps)"]
    if summary.get("val_loss") is not None:
        lines.append(f"validation       loss {summary['val_loss']:.4f}, perplexity "
                     f"{summary['val_ppl']:.2f}")
    for key, value in sorted(summary.get("experts", {}).items()):
        if key.endswith("/usage"):
            layer = key[len("experts/"):-len("/usage")]
            uneven = summary["experts"].get(f"experts/{layer}/unevenness", float("nan"))
            lines.append(f"experts {layer}: usage {100 * value:.1f}%, unevenness {uneven:.3f}")
    if summary.get("skipped_steps"):
        lines.append(f"skipped steps    {summary['skipped_steps']} (non-finite loss or gradients)")
    lines.append(f"throughput       {summary['tokens_per_s']:.0f} tokens/s (all ranks)")
    saves = summary.get("checkpoints") or []
    if saves:
        pause = sum(c["checkpoint_pause_s"] for c in saves) / len(saves)
        write = sum(c["checkpoint_write_s"] for c in saves) / len(saves)
        how = "in the background" if summary.get("checkpoint_async") else "in the foreground"
        lines.append(f"checkpoints      {len(saves)} written {how}: training paused {pause:.2f} s,"
                     f" whole write {write:.2f} s (mean)")
    for r, mem in enumerate(summary["expert_mib_per_rank"]):
        lines.append(f"rank {r} experts    {mem:.2f} MiB (table shards + optimizer state), peak "
                     f"RSS {summary['peak_rss_mib_per_rank'][r]:.0f} MiB")
    lines += [f"logs             {summary['log_dir']} (tensorboard --logdir {summary['log_dir']})",
              f"checkpoint       {summary['checkpoint']}"]
    return lines
