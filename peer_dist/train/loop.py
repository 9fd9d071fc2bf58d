"""The training job: set-up, then a loop that reads top to bottom
(lr, forward, backward, clip, step, log), evaluation, checkpoints and the final summary.

Shapes: B = micro-batch per rank, L = sequence length, W = world size, G = grad_accum.
Global batch of step s = G micro-batches of W*B sequences; rank r reads sequences
[r*B, (r+1)*B) of each, so the step reads the same sequences at any W as long as G*W*B is the
same (1 rank with B*W sequences sees exactly what W ranks with B each see);
train.global_batch_size keeps G*W*B fixed by deriving G (train/resume.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from peer_dist.cli import plural
from peer_dist.config import Config, save_config
from peer_dist.errors import UserError
from peer_dist.model.transformer import build_model, lm_loss
from peer_dist.train import checkpoint as ckpt
from peer_dist.train import faults, preempt
from peer_dist.train.deepspeed_setup import (
    apply_dense_clip,
    build_engine,
    clip_factor,
    dense_grad_norm,
    nonfinite_dense_param,
    resolve_dtype,
    set_lr,
    torch_optimizer,
)
from peer_dist.train.hangs import FaultStore, is_comm_failure
from peer_dist.train.metrics import (
    Logger,
    expert_memory_bytes,
    gather_objects,
    memory_stats,
    summary_lines,
)
from peer_dist.train.nonfinite import (
    SkipTracker,
    first_nonfinite,
    optimizer_step_skipped,
    restore_running_stats,
    running_stats,
)
from peer_dist.train.preempt import Control, Interrupted
from peer_dist.train.resume import Schedule, on_resume, resolve_batch
from peer_dist.train.resume import meta as resume_meta
from peer_dist.train.sparse_optim import STATE_DTYPES, RowSparseOptimizer, grad_sq_norm, scale_grads
from peer_dist.train.startup import RunDirLock, agree, check_same_config, open_data

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from peer_dist.data import TokenDataset
    from peer_dist.parallel import ExpertShard, Topology

def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from base to base * min_ratio (the
    schedule of a run that was never resumed with another length)."""
    return base * Schedule(warmup, 1.0, total).ratio(step, warmup, min_ratio)


@dataclass
class Job:
    cfg: Config
    topo: Topology
    engine: DeepSpeedEngine
    shards: list[ExpertShard]
    table_opt: RowSparseOptimizer
    data: TokenDataset
    dtype: torch.dtype
    skips: SkipTracker
    lock: RunDirLock
    fault_store: FaultStore | None
    control: Control
    saver: ckpt.Saver
    schedule: Schedule
    step: int = 0
    checkpoints: list[dict[str, float]] = field(default_factory=list)  # pause, write times

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def table_params(self) -> list[torch.Tensor]:
        return [t for s in self.shards for t in (s.u, s.v)]


# --------------------------------------------------------------------------- set-up

def setup(cfg: Config, lock: RunDirLock) -> Job:
    """Process group, the run folder's lock, data, model -> parallelize -> DeepSpeed engine +
    table optimizer."""
    from peer_dist.parallel import Topology, expert_shards, parallelize
    from peer_dist.parallel.topology import init_distributed

    init_distributed(timeout_s=cfg.train.collective_timeout_s)
    check_same_config(cfg)
    topo = Topology.build(cfg.parallel.ep)
    agree(lock.acquire, rank0_only=True)
    data = open_data(cfg)
    replaced = resolve_batch(cfg, topo.world_size)  # train.global_batch_size -> grad_accum
    if replaced and topo.rank == 0:
        print(replaced, flush=True)
    dtype = resolve_dtype(cfg, topo.device)
    model = build_model(cfg.model, cfg.train.seed, materialize=False)
    model = parallelize(model, topo, cfg.parallel).to(topo.device)  # shards are on the device
    engine = build_engine(model, cfg, dtype)
    shards = expert_shards(engine.module)
    o = cfg.optim
    table_opt = RowSparseOptimizer([t for s in shards for t in (s.u, s.v)],
                                   kind=o.table_optimizer, lr=o.table_lr or o.lr,
                                   betas=tuple(o.betas), eps=o.eps,
                                   state_dtype=STATE_DTYPES[o.table_state_dtype],
                                   bias_correction=o.table_bias_correction)
    for s in shards:  # allocate state now: memory is visible and checkpoints are complete
        table_opt.init_state(s.u)
        table_opt.init_state(s.v)
    skips = SkipTracker(cfg.train.nonfinite, cfg.train.max_skipped)
    store = FaultStore(cfg.train.collective_timeout_s) if topo.world_size > 1 else None
    # a rank that reaches no step boundary after a signal is hung (its peers time out too)
    control = Control(cfg.train.ckpt_every_s, hung_after_s=cfg.train.collective_timeout_s
                      if topo.world_size > 1 else 0.0)
    control.install()  # from here on a signal stops the run at a step boundary, saved
    saver = ckpt.Saver(cfg, topo, background=cfg.train.checkpoint_async)
    if saver.background:  # the staging buffers now, not in the first checkpoint's pause
        saver.stage(ckpt.table_state(shards, table_opt, topo.mesh))
    return Job(cfg, topo, engine, shards, table_opt, data, dtype, skips, lock, store, control,
               saver, Schedule.fresh(cfg))


def micro_batch(job: Job, step: int, micro: int, split: str = "train") -> tuple[torch.Tensor, ...]:
    """Rank r's slice of global micro-batch (step, micro): (inputs, targets), each (B, L)."""
    t, topo = job.cfg.train, job.topo
    global_micro = step * t.grad_accum + micro
    # The loader reads samples [i*B, (i+1)*B) of one stream for index i: index
    # global_micro * W + r is rank r's slice of global micro-batch `global_micro`.
    x, y = job.data.batch(split, global_micro * topo.world_size + topo.rank, 0, t.batch_size,
                          t.seq_len, t.seed)
    return x.to(topo.device), y.to(topo.device)


def step_batches(job: Job, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's G micro-batches, with every token id checked on every rank (one small
    all-reduce): an id beyond the vocabulary would read outside the embedding."""
    batches = [micro_batch(job, step, m) for m in range(job.cfg.train.grad_accum)]
    top = torch.tensor([max(int(t.max()) for b in batches for t in b)], device=job.topo.device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    vocab = job.cfg.model.vocab_size
    if int(top) >= vocab:
        raise UserError(f"data.path={job.cfg.data.path!r}: token id {int(top)} in the batch of "
                        f"step {step + 1} is beyond model.vocab_size={vocab}; allowed are ids "
                        f"in [0, {vocab}): re-prepare the data or raise model.vocab_size",
                        all_ranks=True)
    return batches


# --------------------------------------------------------------------------- one step

def train_step(job: Job, step: int) -> dict[str, float]:
    """One optimizer step over G micro-batches; returns this step's metrics (all ranks).
    A step with a non-finite loss or gradient anywhere is skipped on every rank."""
    from peer_dist.parallel import sync_expert_grads

    cfg, engine, rank = job.cfg, job.engine, job.topo.rank
    o, g_acc = cfg.optim, cfg.train.grad_accum
    t0 = time.perf_counter()

    # lr: one schedule shape for both parts; the tables may have their own base lr.
    lr = o.lr * job.schedule.ratio(step, o.warmup_steps, o.min_lr_ratio)
    set_lr(engine, lr)
    for group in job.table_opt.param_groups:
        group["lr"] = lr / o.lr * (o.table_lr or o.lr)

    stats_before = running_stats(job.model)  # restored if this step is skipped
    loss_sum = torch.zeros((), dtype=torch.float64)
    for micro, (inputs, targets) in enumerate(step_batches(job, step)):
        faults.maybe_hang(rank, step + 1)
        # forward + backward: engine.backward scales the loss gradient by 1/G, which reaches
        # the table gradients too (they hang off the same graph).
        loss = lm_loss(engine(inputs), targets)
        if micro == 0 and faults.armed("nan_loss", rank, step + 1):
            loss = loss * float("nan")
        engine.backward(loss + engine.module.aux_loss())  # MoE load balancing (else 0)
        loss_sum += loss.detach().double().cpu()
        if micro < g_acc - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    # check: the global loss and every norm, finite or not, agreed by all ranks.
    sync_expert_grads(job.model)
    dense_norm = dense_grad_norm(engine)
    loss_total, table_sq = _reduce_loss_and_table_norms(job, loss_sum)
    where = first_nonfinite(loss_total, dense_norm, table_sq,
                            nonfinite_dense_param(engine) if not math.isfinite(dense_norm)
                            else "")
    if job.skips.record(step + 1, where):
        _skip(job, stats_before)
    else:
        # clip: one global norm over dense and table gradients.
        _, factor = clip_factor(o.grad_clip, dense_norm, sum(table_sq.values()))
        apply_dense_clip(engine, factor, dense_norm)
        if factor < 1.0:
            scale_grads(job.table_params(), factor)
        # step: DeepSpeed for the dense part, ours for the shards.
        engine.step()
        job.table_opt.step()
    for p in job.table_params():
        p.grad = None

    # log: mean loss over the global batch (equal token counts per rank and micro-batch).
    loss_mean = loss_total / (g_acc * job.topo.world_size)
    seconds = time.perf_counter() - t0
    tokens = g_acc * job.topo.world_size * cfg.train.batch_size * cfg.train.seq_len
    table_norm = math.sqrt(sum(table_sq.values()))
    out = {"loss": loss_mean, "ppl": math.exp(min(loss_mean, 50)), "lr": lr,
           "grad_norm": math.sqrt(dense_norm ** 2 + table_norm ** 2),
           "dense_grad_norm": dense_norm, "table_grad_norm": table_norm,
           "tokens_per_s": tokens / seconds, "step_seconds": seconds,
           "skipped": float(where is not None), "skipped_total": float(job.skips.total)}
    if where is None:
        out["clip_factor"] = factor
    else:
        log_text(job, f"peer-train: step {step + 1}: non-finite value in {where}; step skipped "
                 f"({job.skips.streak} in a row, train.max_skipped={cfg.train.max_skipped})")
    return out


def _reduce_loss_and_table_norms(job: Job, loss_sum: torch.Tensor) -> tuple[float, dict]:
    """One all-reduce: (global loss sum, {layer: squared norm of its table gradients}); it
    also carries the stop and checkpoint votes (job.control).

    Each table row is owned by one EP rank and its DP replicas hold copies after
    sync_expert_grads, so a sum over the world counts every row DP times: divide by DP."""
    sq = [grad_sq_norm([s.u, s.v]) for s in job.shards]
    votes = torch.tensor(job.control.vote(job.topo.rank), dtype=torch.float64)
    v = torch.cat([loss_sum.reshape(1), votes, torch.stack(sq).double().reshape(-1)]
                  if sq else [loss_sum.reshape(1), votes]).to(job.topo.device)
    dist.all_reduce(v)
    v = v.cpu()
    job.control.tally(v[1:1 + len(votes)].tolist())
    return float(v[0]), {s.name: float(v[1 + len(votes) + i]) / job.topo.dp
                         for i, s in enumerate(job.shards)}


def _skip(job: Job, stats_before: dict[str, torch.Tensor]) -> None:
    """Leave parameters, optimizer states and running statistics as they were before the step."""
    with optimizer_step_skipped(torch_optimizer(job.engine)):
        job.engine.step()  # DeepSpeed's bookkeeping: zeroes its gradients, ends the boundary
    restore_running_stats(job.model, stats_before)


def log_text(job: Job, message: str) -> None:
    if job.topo.rank == 0:
        print(message, flush=True)


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(job: Job) -> dict[str, float]:
    """Validation loss / perplexity over train.eval_batches global batches (the sequences of an
    optimizer step: batch_size x world size x grad_accum, the same held-out sequences at every
    world size and micro-batch of one global batch), and expert usage and unevenness per PEER
    layer. Every rank runs the same number of forwards (the sharded layers are collective); a
    rank with no batch left repeats one with weight 0."""
    from peer_dist.train.expert_stats import ExpertStats

    cfg, topo, engine = job.cfg, job.topo, job.engine
    layers = {name: m for name, m in job.model.named_modules() if hasattr(m, "record_routing")}
    stats = {name: ExpertStats(m.cfg.num_experts) for name, m in layers.items()}
    batches = list(job.data.eval_batches(cfg.train.batch_size, cfg.train.seq_len, "val",
                                         max_batches=cfg.train.eval_batches * topo.world_size
                                         * cfg.train.grad_accum,
                                         rank=topo.rank, world_size=topo.world_size))
    n_iter = torch.tensor([len(batches)])
    dist.all_reduce(n_iter, op=dist.ReduceOp.MAX)
    engine.eval()
    for m in layers.values():
        m.record_routing = True
    sums = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, tokens)
    for i in range(int(n_iter)):
        weight = 1.0 if i < len(batches) else 0.0
        inputs, targets = batches[min(i, len(batches) - 1)]
        logits = engine(inputs.to(topo.device))
        loss = lm_loss(logits, targets.to(topo.device))
        sums += torch.tensor([float(loss) * targets.numel(), targets.numel()]) * weight
        for name, m in layers.items():
            if weight and m.last_routing is not None:
                ids, gates = m.last_routing
                stats[name].add(ids.cpu(), gates.float().cpu())
    for m in layers.values():
        m.record_routing, m.last_routing = False, None
    engine.train()
    dist.all_reduce(sums)
    val_loss = float(sums[0] / sums[1])
    out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
    for name, s in stats.items():
        dist.all_reduce(s.counts)
        if float(s.counts.sum()) > 0:
            out[f"experts/{name}/usage"] = s.usage()
            out[f"experts/{name}/unevenness"] = s.unevenness()
    return out


# --------------------------------------------------------------------------- the job

def exchange_note(job: Job) -> str:
    """How the expert layers reach their rows, from the settings that apply (and those that
    do not, named: a setting with no effect is said, not ignored)."""
    from peer_dist.parallel.parallelize import sharded_modules

    p, m = job.cfg.parallel, job.cfg.model
    if not sharded_modules(job.model):
        what = (f"model.sparse_kind={m.sparse_kind}: its layers are replicated on every rank"
                if m.sparse_kind != "peer" else "no PEER layer (model.peer_blocks="
                f"{m.peer_blocks!r})")
        return (f"expert tables: none to shard ({what}); parallel.ep, strategy and "
                "overlap_chunks have no effect")
    if job.topo.ep == 1:
        return ("expert tables: EP 1, every row on every rank (no exchange; parallel.strategy "
                "and overlap_chunks have no effect)")
    how = p.strategy + (" (the cost model's choice each step: comm/<layer>/strategy/<name> in "
                        "the metrics)" if p.strategy == "auto" else "")
    chunks = f", {p.overlap_chunks} overlap chunks" if p.overlap_chunks > 1 else ""
    return f"expert tables: EP {job.topo.ep}, exchange {how}{chunks}"


def comm_scalars(job: Job, steps: int) -> dict[str, float]:
    """All-to-all bytes and seconds per PEER layer per step since the last call (this rank)."""
    from peer_dist.parallel import comm_stats, reset_comm_stats

    out = {}
    for layer, s in comm_stats(job.model).items():
        out[f"comm/{layer}/bytes_sent"] = s["bytes_sent"] / steps
        out[f"comm/{layer}/bytes_recv"] = s["bytes_recv"] / steps
        out[f"comm/{layer}/seconds"] = s["seconds"] / steps
        if s["grad_rows"]:
            out[f"comm/{layer}/grad_rows"] = s["grad_rows"]
        for name, calls in s["strategy_calls"].items():  # forward calls by strategy
            out[f"comm/{layer}/strategy/{name}"] = calls
    reset_comm_stats(job.model)
    return out


def memory_scalars(job: Job) -> dict[str, float]:
    """Memory of every rank (gathered), in MiB."""
    mine = memory_stats(job.topo.device)
    mine["expert_mib"] = expert_memory_bytes(job.shards, job.table_opt) / 2**20
    out = {}
    for r, stats in enumerate(gather_objects(mine)):
        out.update({f"memory/rank{r}/{k}": v for k, v in stats.items()})
    return out


def run(cfg: Config) -> dict[str, Any]:
    """Train per cfg (every rank calls this); returns the summary (on every rank). A collective
    that fails ends the run with a JobFault naming the ranks that did not take part."""
    lock = RunDirLock(cfg.train.run_dir)
    try:
        job = setup(cfg, lock)
    except BaseException:  # refused before training: no run folder left holding only .lock
        lock.release(tidy=True)
        raise
    try:
        return _run(job)
    except Exception as e:
        if job.fault_store is not None and is_comm_failure(e):
            fault = job.fault_store.fault(job.step + 1, e,
                                          stopping=lambda: job.control.received is not None)
            if job.control.received is not None:
                # Signalled, then a peer gone: the launcher is stopping the ranks because one
                # died. This rank leaves as the signal would have ended it, so the launcher
                # names the rank that died first, in its one line.
                preempt.die_by(job.control.received)
            raise fault from None
        raise
    finally:
        job.control.uninstall()
        job.lock.release()


def _run(job: Job) -> dict[str, Any]:
    cfg = job.cfg
    t = cfg.train
    resume = ckpt.find_resume(cfg)  # verified: sizes, checksums (collective)
    if resume is not None:
        job.step = ckpt.load_checkpoint(resume, cfg, job.engine, job.shards, job.table_opt,
                                        job.topo)
        job.schedule, notes = on_resume(resume, job.step, cfg, job.topo)
        for line in notes:  # one line for each thing that changed since the checkpoint
            log_text(job, line)
    if job.topo.rank == 0:  # checkpoints after the resumed step belong to an abandoned timeline
        ckpt.start_timeline(ckpt.checkpoint_root(cfg), job.step)
    dist.barrier()
    log = Logger(t.run_dir, job.topo.rank, t.steps, job.step)
    if job.topo.rank == 0:
        save_config(cfg, Path(t.run_dir) / "config.yaml")
    log.text(f"peer-train: {job.topo.describe()}; {plural(t.steps, 'step')}, "
             f"ZeRO {t.zero_stage}, {str(job.dtype).replace('torch.', '')}"
             + (f"; resumed from {resume} at step {job.step}" if resume else ""))
    log.text(f"peer-train: {exchange_note(job)}")
    last: dict[str, float] = {}
    timed_tokens, timed_seconds, since_log = 0.0, 0.0, 0
    while job.step < t.steps:
        last = train_step(job, job.step)
        job.step += 1
        since_log += 1
        if job.step > 1 or resume is not None:  # the first step includes warm-up costs
            timed_tokens += last["tokens_per_s"] * last["step_seconds"]
            timed_seconds += last["step_seconds"]
        log.scalars(job.step, last)
        faults.maybe_kill("kill", job.topo.rank, job.step)
        if job.step % t.log_every == 0 or job.step == t.steps:
            log.scalars(job.step, {**comm_scalars(job, since_log), **memory_scalars(job)})
            log.progress(job.step, last)
            since_log = 0
        if job.step % t.eval_every == 0 and job.step < t.steps:
            log.scalars(job.step, evaluate(job), kind="val")
        if job.step < t.steps and (job.control.save_due or job.control.stop or (
                t.ckpt_every and job.step % t.ckpt_every == 0)):
            path = _save(job, log)
            if job.control.stop:
                _stop(job, log, path)
    final_eval = evaluate(job)
    log.scalars(job.step, final_eval, kind="val")
    path = _save(job, log)
    job.saver.wait()
    _saved(job, log)
    summary = _summary(job, last, final_eval, timed_tokens, timed_seconds, log, path)
    for line in summary_lines(summary):
        log.text(line)
    if job.topo.rank == 0:
        (Path(t.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    log.close()
    return summary


def _save(job: Job, log: Logger) -> Path:
    """Save checkpoint job.step (in the background with train.checkpoint_async), after the
    one still in flight."""
    path = job.saver.save(job.step, job.engine, job.shards, job.table_opt,
                          resume_meta(job.schedule, job.cfg, job.topo.world_size))
    job.control.saved()
    _saved(job, log)
    return path


def _saved(job: Job, log: Logger) -> None:
    """Finished saves' pause and write time into metrics.jsonl (kind "checkpoint")."""
    for done in job.saver.done:
        job.checkpoints.append(done)
        log.scalars(int(done["step"]), {k: v for k, v in done.items() if k != "step"},
                    kind="checkpoint")
    job.saver.done.clear()


def _stop(job: Job, log: Logger, path: Path) -> None:
    """Every rank: the run was asked to stop and its checkpoint is saved; leave in one line."""
    c = job.control
    job.saver.wait()  # the stop's checkpoint is complete before we leave
    _saved(job, log)
    if job.topo.rank == 0:
        preempt.write_marker(job.cfg.train.run_dir, job.step, c.signal_name, path)
    log.close()
    raise Interrupted(f"stopped by {c.signal_name} at step {job.step} of {job.cfg.train.steps}"
                      f": checkpoint {path} saved in "
                      f"{job.checkpoints[-1]['checkpoint_write_s']:.1f} s; the same command "
                      f"resumes from it (exit status {preempt.EXIT_INTERRUPTED})",
                      all_ranks=True)


def _summary(job: Job, last: dict, final_eval: dict, tokens: float, seconds: float,
             log: Logger, path: Path) -> dict[str, Any]:
    mem = gather_objects({"expert": expert_memory_bytes(job.shards, job.table_opt) / 2**20,
                          "rss": memory_stats(job.topo.device)["peak_rss_mib"]})
    usage = {k: v for k, v in final_eval.items() if k.startswith("experts/")}
    return {
        "steps": job.step, "world_size": job.topo.world_size, "ep": job.topo.ep,
        "zero_stage": job.cfg.train.zero_stage, "dtype": str(job.dtype).replace("torch.", ""),
        "final_loss": last.get("loss", float("nan")), "val_loss": final_eval["val_loss"],
        "skipped_steps": job.skips.total,
        "checkpoints": job.checkpoints, "checkpoint_async": job.saver.background,
        "val_ppl": final_eval["val_ppl"],
        "tokens_per_s": tokens / seconds if seconds > 0 else last.get("tokens_per_s", 0.0),
        "expert_mib_per_rank": [m["expert"] for m in mem],
        "peak_rss_mib_per_rank": [m["rss"] for m in mem],
        "experts": usage, "log_dir": str(log.log_dir), "checkpoint": str(path),
    }
