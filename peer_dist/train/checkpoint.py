"""Checkpoints: one directory per step, written whole or not at all.

    <run_dir>/checkpoints/
      step_000100/
        dense/            engine.save_checkpoint: module + ZeRO optimizer partitions (exact resume
                          at the same world size and ZeRO stage)
        dense_full.pt     consolidated fp32 dense module state_dict (any world size / stage)
        tables/           torch.distributed.checkpoint: every table shard and its optimizer state
                          as DTensors on the (dp, ep) mesh, [Replicate(), Shard(0)] (torch.chunk
                          rows), so a different world size or EP reshards them on load
        rng/rank_<r>.pt   torch / CUDA / numpy / python RNG states of each rank
        meta.json         step, world size, ep, zero stage, table optimizer
        config.yaml       the resolved config
        manifest.json     every other file's size and SHA-256, written last
      latest              name of the newest complete checkpoint (replaced last, atomically)

A checkpoint is written to `.tmp_step_...`, hashed into its manifest, and renamed when every
rank has finished; only then is `latest` moved, and checkpoints beyond `train.keep_last` are
removed (never the one just written). Replacing a step that exists renames the old one aside
first and deletes it last. A kill at any point leaves the previous checkpoints as they were.
The checkpoints form one timeline: a run that resumes from step s (or starts at 0) first moves
every checkpoint of a later step into checkpoints/abandoned/. The training data position is the
step itself (batches are a function of the global step).

Loading verifies first: sizes and checksums against the manifest (hashing spread over the
ranks), then the config keys that fix tensor shapes and layouts. A damaged or incomplete
checkpoint is never handed to torch.load or DCP (a damaged pickle can crash the process there).
With train.resume=auto the newest valid checkpoint is taken, with one warning line naming what
was wrong with newer ones; an explicit train.resume=<path> must be valid. A checkpoint written
before manifests existed (meta.json, no manifest.json) is loaded with a warning that it cannot
be verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from peer_dist.config import Config, save_config, to_dict
from peer_dist.errors import UserError
from peer_dist.train import faults, safe_load

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from torch.distributed.device_mesh import DeviceMesh

    from peer_dist.parallel import ExpertShard, Topology
    from peer_dist.train.sparse_optim import RowSparseOptimizer

LATEST = "latest"
MANIFEST = "manifest.json"
# SHA-256: 1.8 GB/s per process here (the CPU's SHA instructions), within 2x of zlib.crc32 and
# 2x faster than blake2b, and no accidental collisions; each rank hashes a share of the files.
HASH = "sha256"
# Config keys (dotted prefixes) that fix the checkpoint's tensor shapes and row layout.
LAYOUT_KEYS = ("model.", "optim.table_optimizer", "optim.table_state_dtype",
               "optim.table_bias_correction", "parallel.balance_ids")


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def find_resume(cfg: Config, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from per train.resume (auto | never | a checkpoint path),
    verified (collectively, when the process group is up). auto: the newest valid checkpoint,
    one warning line (rank 0) about any newer one that is not; none valid: None."""
    spec = cfg.train.resume
    if spec == "never":
        return None
    root = checkpoint_root(cfg)
    if _rank() == 0 and root.is_dir():
        recover(root)  # an interrupted replacement of a step, finished or undone
    if dist.is_initialized():
        dist.barrier()
    if spec != "auto":
        path = Path(spec)
        if (path / LATEST).is_file():  # a checkpoints/ folder: take its newest
            path = path / (path / LATEST).read_text().strip()
        problem = verify(path)
        if problem is not None:
            raise UserError(f"train.resume={spec!r}: {problem}; allowed are auto, never, or a "
                            "complete checkpoint directory", all_ranks=True)
        return path
    bad = []
    for path in _candidates(checkpoint_root(cfg)):
        problem = verify(path)
        if problem is None:
            if bad and _rank() == 0:
                log(f"peer-train: warning: {'; '.join(bad)}; resuming from {path.name}")
            return path
        bad.append(f"checkpoint {path.name} {problem}")
    if bad and _rank() == 0:
        log(f"peer-train: warning: {'; '.join(bad)}; no valid checkpoint left, starting from "
            "step 0")
    return None


def _candidates(root: Path) -> list[Path]:
    """Every step_* directory, newest first. Not `latest` first: a kill between renaming a new
    checkpoint in and moving `latest` leaves the pointer one behind, and every folder here is
    of the current timeline (start_timeline), so the newest valid one is the one to take."""
    return list(reversed(_steps(root)))


# --------------------------------------------------------------------------- manifest

def _warn(message: str) -> None:
    print(f"peer-train: warning: {message}", flush=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather(obj: Any, group: Any = None) -> list[Any]:
    """obj from every rank (one process: [obj])."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def _share(items: list[str]) -> list[str]:
    """This rank's share of a list every rank holds alike."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return items[_rank()::world]


def file_digest(path: Path) -> str:
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, group: Any = None) -> None:
    """manifest.json: size and checksum of every file under root. Collective (over `group`,
    which spans the world): each rank hashes a share of the files; rank 0 writes it."""
    names = _gather(_listing(root) if _rank() == 0 else None, group)[0]
    mine = {n: {"size": (root / n).stat().st_size, HASH: file_digest(root / n)}
            for n in _share(names)}
    entries: dict[str, Any] = {}
    for part in _gather(mine, group):
        entries.update(part)
    if _rank() == 0:
        body = {"version": 1, "hash": HASH, "files": dict(sorted(entries.items()))}
        _write_atomic(root / MANIFEST, json.dumps(body, indent=1))


def verify(path: Path) -> str | None:
    """What is wrong with checkpoint `path`, or None if it is complete and intact. Collective
    when the process group is up: every rank returns the same answer."""
    problem = _check_manifest(path)
    if problem is None:
        has_manifest = (path / MANIFEST).is_file()
        files = json.loads((path / MANIFEST).read_text())["files"] if has_manifest else \
            {n: {} for n in _listing(path)}  # written before manifests: nothing to hash against
        for n in _share(sorted(files)):
            problem = (_check_file(path, n, files[n]) if has_manifest else None) or \
                safe_load.problem(path, n)  # a pickle that is more than data: refused
            if problem:
                break
    problems = [p for p in _gather(problem) if p]
    return problems[0] if problems else None


META_KEYS = ("step", "world_size", "ep", "zero_stage", "table_optimizer")  # what loading reads


def _legacy_meta_problem(path: Path) -> str | None:
    """A checkpoint without a manifest (an older version's) has only its meta.json to say it
    is one: it must hold what loading reads."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        missing = [k for k in META_KEYS if k not in meta]
        bad = not all(isinstance(meta.get(k), int) for k in META_KEYS[:4])
    except (OSError, ValueError, TypeError, AttributeError):
        return "is damaged: meta.json is not a JSON object (and there is no manifest.json)"
    if missing or bad:
        return (f"is damaged: meta.json lacks {missing or 'whole numbers'} (and there is no "
                "manifest.json)")
    return None


def _check_manifest(path: Path) -> str | None:
    """Sizes against the manifest (cheap; every rank); None when they all match."""
    if not path.is_dir():
        return "is a file, not a checkpoint folder" if path.exists() else "does not exist"
    manifest = path / MANIFEST
    if not manifest.is_file():
        if (path / "checkpoints").is_dir():
            return (f"is a run folder, not a checkpoint: name one in "
                    f"{str(path / 'checkpoints')!r}, or set train.run_dir={str(path)!r} "
                    "(train.resume=auto takes its newest)")
        if (path / "meta.json").is_file() and (path / "tables").is_dir():
            return _legacy_meta_problem(path)  # before manifests: loaded, with a warning
        if (path / "meta.json").is_file() and (path / "train.bin").is_file():
            return "is a prepared dataset, not a checkpoint"
        return "is incomplete (no manifest.json)"
    try:
        files = json.loads(manifest.read_text())["files"]
        sizes = {n: int(e["size"]) for n, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return "is damaged: manifest.json is not a valid manifest"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"is incomplete: {name} is missing"
        if f.stat().st_size != size:
            return f"is damaged: {name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def _check_file(path: Path, name: str, entry: dict) -> str | None:
    got = file_digest(path / name)
    if got != entry.get(HASH):
        return f"is damaged: {name} has {HASH} {got[:12]}..., the manifest says " \
               f"{str(entry.get(HASH))[:12]}..."
    return None


def check_compatible(path: Path, cfg: Config) -> None:
    """Refuse, before anything is loaded, a checkpoint whose tensors this config cannot take:
    one line listing every layout key that differs."""
    import yaml

    from peer_dist.train.startup import config_diff

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return  # written before configs were saved: the shapes are checked on load
    # a key the checkpoint's config lacks came later: its default is what the run used
    diff = [(k, a, b) for k, a, b in config_diff(saved, to_dict(cfg))
            if k.startswith(LAYOUT_KEYS) and a is not None]
    if diff:
        shown = ", ".join(f"{k}={a!r} (checkpoint) vs {b!r} (this run)" for k, a, b in diff)
        kinds = {"model": "another model", "optim": "another table optimizer",
                 "parallel": "another order of the experts"}
        what = " and ".join(dict.fromkeys(kinds[k.split(".")[0]] for k, _, _ in diff))
        raise UserError(f"checkpoint {str(path)!r} was written for {what}: {shown}; "
                        "allowed: the same values, or train.resume=never, or another "
                        "train.run_dir", all_ranks=True)


# --------------------------------------------------------------------------- tables as DTensors

def _as_dtensor(local: torch.Tensor, mesh: DeviceMesh, full_rows: int) -> Any:
    """A shard's local rows as a DTensor of the full table: Shard(0) over ep, Replicate over dp."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape = (full_rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False,
                              shape=torch.Size(shape), stride=stride)


def table_state(shards: list[ExpertShard], table_opt: RowSparseOptimizer,
                mesh: DeviceMesh) -> dict[str, Any]:
    """DCP state dict of the shards and their optimizer state, keyed by shard name."""
    state: dict[str, Any] = {}
    for shard in shards:
        for side in ("u", "v"):
            p = getattr(shard, side)
            key = f"{shard.name}.{side}"
            state[key] = _as_dtensor(p.data, mesh, shard.num_experts)
            for name, value in table_opt.init_state(p).items():
                if name == "step":  # the same on every rank: stored once (replicated)
                    state[f"{key}.opt.step"] = value
                else:
                    state[f"{key}.opt.{name}"] = _as_dtensor(value, mesh, shard.num_experts)
    return state


# --------------------------------------------------------------------------- saving

def save_checkpoint(step: int, cfg: Config, engine: DeepSpeedEngine,
                    shards: list[ExpertShard], table_opt: RowSparseOptimizer,
                    topo: Topology) -> Path:
    """Write checkpoint `step` collectively (every rank calls this) and wait for it."""
    saver = Saver(cfg, topo, background=False)
    return saver.save(step, engine, shards, table_opt)


class Saver:
    """Writes checkpoints, in the foreground or (`train.checkpoint_async`) in the background.

    Foreground: training waits for the whole write. Background: training pauses only while
    the small parts are written (dense state, RNG, config) and the tables and their optimizer
    state are staged (copied in host memory); a thread then writes the staged tables through
    DCP on a process group of its own, hashes the manifest and renames the checkpoint into
    place. One save is in flight at a time: the next save, the end of the run and a stop wait
    for it. A kill during a background write leaves a `.tmp_` folder without a manifest,
    which is never resumed from, and the previous checkpoint as it was.
    Each finished save's step, pause (training stopped, including any wait for the save
    before it) and whole write time (seconds) are appended to `done`."""

    def __init__(self, cfg: Config, topo: Topology, background: bool):
        self.cfg, self.topo, self.background = cfg, topo, background
        # gloo even where training uses NCCL: the staged tables are in host memory
        self.group = dist.new_group(backend="gloo") if background else None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.pending: dict[str, float] = {}
        self.done: list[dict[str, float]] = []
        self.buffers: dict[str, torch.Tensor] = {}  # staging copies of the tables (background)

    def save(self, step: int, engine: DeepSpeedEngine, shards: list[ExpertShard],
             table_opt: RowSparseOptimizer, extra: dict | None = None) -> Path:
        """Start checkpoint `step` (collective); returns the path it will have. `extra` goes
        into meta.json."""
        t0 = time.perf_counter()
        self.wait()  # one in flight: training waits for the previous one, counted as pause
        waited = time.perf_counter() - t0
        cfg, topo = self.cfg, self.topo
        root = checkpoint_root(cfg)
        final, tmp = root / step_name(step), root / f".tmp_{step_name(step)}"
        if topo.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(tmp), tag="dense", save_latest=False)
        full = consolidated_dense_state(engine)
        torch.save(rng_state(), tmp / "rng" / f"rank_{topo.rank}.pt")
        if topo.rank == 0:
            torch.save(full, tmp / "dense_full.pt")
            save_config(cfg, tmp / "config.yaml")
            meta = dict(step=step, world_size=topo.world_size, ep=topo.ep,
                        zero_stage=cfg.train.zero_stage, dtype=engine_dtype(engine),
                        table_optimizer=cfg.optim.table_optimizer, **(extra or {}))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tables = table_state(shards, table_opt, topo.mesh)
        if self.background:
            tables = self.stage(tables)
        self.pending = {"step": step, "t0": t0, "checkpoint_pause_s": 0.0,
                        "checkpoint_wait_s": waited}
        if self.background:
            self.pending["checkpoint_pause_s"] = time.perf_counter() - t0
            self.thread = threading.Thread(target=self._finish, args=(step, tables, tmp),
                                           name="checkpoint", daemon=True)
            self.thread.start()
        else:
            self._finish(step, tables, tmp)
            self.pending["checkpoint_pause_s"] = time.perf_counter() - t0
            self.wait()
        return final

    def stage(self, live: dict[str, Any]) -> dict[str, Any]:
        """A copy of `live` in host buffers kept from one save to the next: allocated and
        touched on the first call (the trainer makes it at set-up), since a fresh allocation's
        page faults cost several times the copy (0.75 GiB: 1.0 s against 0.15 s here)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for key, v in live.items():
            local = v.to_local() if isinstance(v, DTensor) else v
            buf = self.buffers.get(key)
            if buf is None or buf.shape != local.shape or buf.dtype != local.dtype:
                buf = self.buffers[key] = torch.zeros(local.shape, dtype=local.dtype)
            buf.copy_(local.detach())
            out[key] = buf if not isinstance(v, DTensor) else DTensor.from_local(
                buf, v.device_mesh, v.placements, run_check=False, shape=v.shape,
                stride=v.stride())
        return out

    def _finish(self, step: int, tables: dict[str, Any], tmp: Path) -> None:
        """Tables, manifest, rename: every rank, on `self.group` (the default group when in
        the foreground)."""
        import torch.distributed.checkpoint as dcp

        try:
            dcp.save(tables, checkpoint_id=str(tmp / "tables"), process_group=self.group)
            faults.maybe_kill("kill_in_ckpt", self.topo.rank, step)  # tests: a rank dies
            dist.barrier(group=self.group)
            write_manifest(tmp, group=self.group)  # last: a folder with a manifest is complete
            dist.barrier(group=self.group)
            if self.topo.rank == 0:
                commit(checkpoint_root(self.cfg), step, self.cfg.train.keep_last)
            dist.barrier(group=self.group)
        except BaseException as e:  # re-raised by wait() in the training thread
            self.error = e
            if not self.background:
                raise
        self.pending["checkpoint_write_s"] = time.perf_counter() - self.pending["t0"]

    def wait(self) -> None:
        """Wait for the save in flight (if any) and move its times to `done`."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if self.pending:
            done, self.pending = self.pending, {}
            done.pop("t0")
            self.done.append(done)


def unsaved_buffers(module: torch.nn.Module) -> set[str]:
    """The names of a module's non-persistent buffers (the rotary tables: rebuilt from the
    config, never part of its state_dict)."""
    return {f"{prefix}.{name}" if prefix else name for prefix, m in module.named_modules()
            for name in m._non_persistent_buffers_set}


def without_unsaved_buffers(state: dict[str, torch.Tensor], module: torch.nn.Module
                            ) -> dict[str, torch.Tensor]:
    """`state` less the module's non-persistent buffers, which ZeRO-3 checkpoints of earlier
    versions saved (at another stage, in peer-sample and peer-export they were refused as
    unexpected keys)."""
    unsaved = unsaved_buffers(module)
    return {k: v for k, v in state.items() if k not in unsaved}


def consolidated_dense_state(engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Full fp32 dense weights on rank 0 (empty elsewhere), the module's state_dict at any
    stage; gathers ZeRO-3 partitions."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if dist.get_rank() == 0:
                    out[name] = p.detach().float().cpu().clone()
        if dist.get_rank() == 0:
            unsaved = unsaved_buffers(module)
            for name, b in module.named_buffers():
                if name not in unsaved:
                    out[name] = b.detach().cpu().clone()
        return out
    if dist.get_rank() != 0:
        return {}
    # At ZeRO 0-2 every rank holds the full (low-precision) weights; DeepSpeed's fp32 master
    # copy is partitioned, so under bf16 the consolidated copy comes from the module itself.
    return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
            for k, v in module.state_dict().items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the timeline
# A run's checkpoints form one timeline: every step_* folder in checkpoints/ was written by the
# run that continues from the newest of them. A resume from step s (or a start from step 0)
# moves every newer folder aside first, so a damaged or abandoned future can never be resumed
# from, take a keep_last slot, or be what `latest` names. Filesystem only: rank 0 calls these.

ABANDONED = "abandoned"


def step_of(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def _steps(root: Path) -> list[Path]:
    """Complete-named checkpoint folders, oldest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                  key=step_of)


def commit(root: Path, step: int, keep_last: int, crash: Callable[[str], None] | None = None
           ) -> Path:
    """Rename the finished `.tmp_step_<step>` into place, point `latest` at it, prune.

    Replacing an existing step never leaves a moment without one of the two: the old folder is
    renamed aside (`.old_step_...`), the new one renamed in, `latest` moved, and only then the
    old one deleted; `recover` finishes or undoes an interrupted replacement. `crash(stage)` is
    for tests: it may raise between the stages, as a kill would stop there."""
    final, tmp, old = root / step_name(step), root / f".tmp_{step_name(step)}", \
        root / f".old_{step_name(step)}"
    crash = crash or (lambda stage: None)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        crash("aside")
    os.replace(tmp, final)
    crash("renamed")
    _write_atomic(root / LATEST, final.name)
    crash("latest")
    shutil.rmtree(old, ignore_errors=True)
    prune(root, keep_last, keep=final)
    return final


def recover(root: Path) -> None:
    """Finish what an interrupted `commit` left: a `.old_step_X` whose `step_X` is missing
    goes back into place (the new one never arrived); one whose `step_X` exists is deleted;
    `latest` names the newest step folder."""
    for old in sorted(root.glob(".old_step_*")):
        final = root / old.name[len(".old_"):]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    steps = _steps(root)  # a kill before `latest` moved leaves it behind (or absent)
    if steps and _pointer(root) != steps[-1].name:
        _write_atomic(root / LATEST, steps[-1].name)


def _pointer(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(errors="replace").strip()
    except OSError:
        return None


def start_timeline(root: Path, step: int, log: Callable[[str], None] = print) -> list[str]:
    """Continue the timeline from `step` (0: a fresh start): move every checkpoint of a later
    step into checkpoints/abandoned/, point `latest` at the checkpoint resumed from (or remove
    it), drop stale temporaries. Returns the names moved (one line says where they went)."""
    if not root.is_dir():
        return []
    recover(root)
    later = [p for p in _steps(root) if step_of(p) > step]
    if later:
        aside = root / ABANDONED
        aside.mkdir(exist_ok=True)
        for p in later:
            target = aside / p.name
            n = 1
            while target.exists():  # the same step abandoned twice: keep both
                target, n = aside / f"{p.name}.{n}", n + 1
            os.replace(p, target)
        log(f"peer-train: {len(later)} checkpoint(s) after step {step} belong to an abandoned "
            f"timeline ({', '.join(p.name for p in later)}): moved to "
            f"{aside} (delete them when no longer wanted)")
    current = root / step_name(step)
    if step > 0 and current.is_dir():
        _write_atomic(root / LATEST, current.name)
    elif (root / LATEST).exists():
        (root / LATEST).unlink()
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return [p.name for p in later]


def prune(root: Path, keep_last: int, keep: Path | None = None) -> None:
    """Remove checkpoints beyond the newest `keep_last` of the timeline (never `keep`, the one
    just written, which is also its newest valid one) and stale temporaries."""
    done = _steps(root)
    for old in done[:-keep_last] + sorted(root.glob(".tmp_step_*")):
        if keep is None or old != keep:
            shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- loading

def load_checkpoint(path: Path, cfg: Config, engine: DeepSpeedEngine,
                    shards: list[ExpertShard], table_opt: RowSparseOptimizer,
                    topo: Topology) -> int:
    """Restore everything from `path` (collectively); returns the step to continue from.

    Same world size and ZeRO stage, or ZeRO 0 on both sides: the engine's own checkpoint
    (weights and optimizer state). Otherwise: the consolidated weights, and the dense optimizer
    state starts afresh (warned).
    The tables and their optimizer state reshard to this world size and EP either way.
    """
    import torch.distributed.checkpoint as dcp

    check_compatible(path, cfg)
    meta = json.loads((path / "meta.json").read_text())
    if meta["table_optimizer"] != cfg.optim.table_optimizer:
        raise UserError(f"optim.table_optimizer={cfg.optim.table_optimizer!r} but checkpoint "
                        f"{str(path)!r} holds {meta['table_optimizer']!r} state: allowed is "
                        f"{meta['table_optimizer']!r}", all_ranks=True)
    if not (path / MANIFEST).is_file() and topo.rank == 0:
        _warn(f"checkpoint {path.name} has no {MANIFEST} (written by an older version): it "
              "cannot be verified")
    saved_dtype, dtype = saved_engine_dtype(path, meta), engine_dtype(engine)
    same_dtype = saved_dtype in (None, dtype)  # None: an older checkpoint that did not say
    same_layout = (meta["world_size"] == topo.world_size
                   and meta["zero_stage"] == cfg.train.zero_stage and same_dtype)
    # ZeRO 0 state is not partitioned: the engine checkpoint loads at any world size.
    with _one_line(path, "dense", all_ranks=False):  # each rank reads its own files
        if same_layout or (meta["zero_stage"] == cfg.train.zero_stage == 0 and same_dtype):
            with safe_load.engine_loads(engine):
                engine.load_checkpoint(str(path), tag="dense", load_module_strict=True)
        else:
            load_dense_weights(engine, safe_load.load_tensors(path / "dense_full.pt"))
            if topo.rank == 0:
                was = "" if same_dtype else f", {saved_dtype}"
                now = "" if same_dtype else f", {dtype}"
                _warn(f"checkpoint {path.name} was written at world size "
                      f"{meta['world_size']}, ZeRO {meta['zero_stage']}{was}; loading at "
                      f"{topo.world_size}, ZeRO {cfg.train.zero_stage}{now}: dense weights "
                      "restored, dense optimizer state reinitialised")
    state = table_state(shards, table_opt, topo.mesh)
    with _one_line(path, "tables", all_ranks=True):  # DCP raises on every rank alike
        dcp.load(state, storage_reader=safe_load.reader(path / "tables"))
    _restore_table_steps(shards, table_opt, state)
    rng_file = path / "rng" / f"rank_{topo.rank}.pt"
    if same_layout and rng_file.is_file():
        set_rng_state(safe_load.load_tensors(rng_file))
    return int(meta["step"])


def engine_dtype(engine: DeepSpeedEngine) -> str:
    """The dense part's training dtype: bf16 or fp32 (train.dtype resolved)."""
    return "bf16" if engine.bfloat16_enabled() else "fp32"


def saved_engine_dtype(path: Path, meta: dict) -> str | None:
    """The dtype checkpoint `path` was trained in: its meta.json's, else its config's where
    that names one (auto depended on the device); None when unknown."""
    if meta.get("dtype"):
        return meta["dtype"]
    import yaml

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
        named = (saved.get("train") or {}).get("dtype")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return named if named in ("bf16", "fp32") else None


@contextlib.contextmanager
def _one_line(path: Path, part: str, all_ranks: bool) -> Iterator[None]:
    """A file that passed verification but still fails to load (damaged before its manifest
    was written, say) ends the run in one line on every rank, not in a traceback per rank."""
    try:
        yield
    except UserError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        lines = str(e).strip().splitlines() or [type(e).__name__]
        # DCP's holds each rank's traceback: its last line is the error itself
        first = (lines[-1] if isinstance(e, CheckpointException) else lines[0])[:200]
        raise UserError(f"checkpoint {str(path)!r}: its {part} state cannot be loaded "
                        f"({type(e).__name__}: {first}); allowed: an intact checkpoint, or "
                        "train.resume=never", all_ranks=all_ranks) from e


def _restore_table_steps(shards: list[ExpertShard], table_opt: RowSparseOptimizer,
                         state: dict[str, Any]) -> None:
    # Plain tensors load in place too, but the step counter is a 0-dim tensor: copy explicitly.
    for shard in shards:
        for side in ("u", "v"):
            key = f"{shard.name}.{side}.opt.step"
            if key in state:
                table_opt.init_state(getattr(shard, side))["step"].copy_(state[key])


def load_dense_weights(engine: DeepSpeedEngine, full: dict[str, torch.Tensor]) -> None:
    """Copy consolidated weights into the engine (every rank reads the file)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = dict(module.named_parameters())
        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(full[name].to(p.dtype))
        for name, b in module.named_buffers():
            if name in full:
                b.copy_(full[name].to(b.dtype))
    else:
        missing, unexpected = module.load_state_dict(without_unsaved_buffers(full, module),
                                                     strict=False)
        if unexpected or [m for m in missing if m in dict(module.named_parameters())]:
            raise KeyError(f"dense_full.pt does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    _refresh_master_weights(engine)


def _refresh_master_weights(engine: DeepSpeedEngine) -> None:
    """ZeRO 1-2 and bf16 keep fp32 master copies: reload them from the new module weights."""
    opt = engine.optimizer
    for hook in ("refresh_fp32_params", "_restore_from_bit16_weights"):
        if hasattr(opt, hook):
            getattr(opt, hook)()
            return


def read_full_state(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint as a full tensor, in one process (for tests and tools)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = dict(safe_load.load_tensors(path / "dense_full.pt"))
    reader = safe_load.reader(path / "tables")
    md = reader.read_metadata()
    tables = {k: torch.empty(m.size, dtype=m.properties.dtype)
              for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(tables, storage_reader=reader, no_dist=True)
    out.update({f"tables.{k}": v for k, v in tables.items()})
    return out


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in one process: weights and tables (read_full_state),
    the tables' optimizer state, and DeepSpeed's files (dense optimizer state). For
    bit-for-bit comparisons of two runs."""
    out = {f"full.{k}": v for k, v in read_full_state(path).items()}

    def walk(prefix: str, obj: object) -> None:
        if torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    for f in sorted((path / "dense").rglob("*.pt")):
        walk(f"dense.{f.name}", safe_load.load_tensors(f, map_location="cpu"))
    return out
