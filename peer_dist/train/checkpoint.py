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
      latest              name of the newest complete checkpoint (replaced last, atomically)

A checkpoint is written to `.tmp_step_...` and renamed when every rank has finished; only then
is `latest` moved, and checkpoints beyond `train.keep_last` are removed. The training data
position is the step itself (batches are a function of the global step).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from peer_dist.config import Config, save_config

LATEST = "latest"


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from per train.resume (auto | never | a checkpoint path)."""
    spec = cfg.train.resume
    if spec == "never":
        return None
    if spec == "auto":
        pointer = checkpoint_root(cfg) / LATEST
        if not pointer.is_file():
            return None
        path = checkpoint_root(cfg) / pointer.read_text().strip()
    else:
        path = Path(spec)
        if (path / LATEST).is_file():  # a checkpoints/ folder: take its newest
            path = path / (path / LATEST).read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"train.resume={spec!r}: {str(path)!r} is not a complete "
                                "checkpoint (no meta.json); allowed are auto, never, or a "
                                "checkpoint directory")
    return path


# --------------------------------------------------------------------------- tables as DTensors

def _as_dtensor(local: torch.Tensor, mesh: Any, full_rows: int) -> Any:
    """A shard's local rows as a DTensor of the full table: Shard(0) over ep, Replicate over dp."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape = (full_rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False,
                              shape=torch.Size(shape), stride=stride)


def table_state(shards: list, table_opt: Any, mesh: Any) -> dict[str, Any]:
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

def save_checkpoint(step: int, cfg: Config, engine: Any, shards: list, table_opt: Any,
                    topo: Any) -> Path:
    """Write checkpoint `step` collectively (every rank calls this); returns its path."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_root(cfg)
    final, tmp = root / step_name(step), root / f".tmp_{step_name(step)}"
    if topo.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="dense", save_latest=False)
    full = consolidated_dense_state(engine)
    dcp.save(table_state(shards, table_opt, topo.mesh), checkpoint_id=str(tmp / "tables"))
    torch.save(rng_state(), tmp / "rng" / f"rank_{topo.rank}.pt")
    if topo.rank == 0:
        torch.save(full, tmp / "dense_full.pt")
        save_config(cfg, tmp / "config.yaml")
        meta = dict(step=step, world_size=topo.world_size, ep=topo.ep,
                    zero_stage=cfg.train.zero_stage, table_optimizer=cfg.optim.table_optimizer)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    dist.barrier()
    if topo.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        prune(root, cfg.train.keep_last)
    dist.barrier()
    return final


def consolidated_dense_state(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 dense weights on rank 0 (empty elsewhere); gathers ZeRO-3 partitions."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if dist.get_rank() == 0:
                    out[name] = p.detach().float().cpu().clone()
        if dist.get_rank() == 0:
            for name, b in module.named_buffers():
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


def prune(root: Path, keep_last: int) -> None:
    """Remove complete checkpoints beyond the newest `keep_last` (and stale temporaries)."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
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

def load_checkpoint(path: Path, cfg: Config, engine: Any, shards: list, table_opt: Any,
                    topo: Any) -> int:
    """Restore everything from `path` (collectively); returns the step to continue from.

    Same world size and ZeRO stage, or ZeRO 0 on both sides: the engine's own checkpoint
    (weights and optimizer state). Otherwise: the consolidated weights, and the dense optimizer
    state starts afresh (warned).
    The tables and their optimizer state reshard to this world size and EP either way.
    """
    import torch.distributed.checkpoint as dcp

    meta = json.loads((path / "meta.json").read_text())
    if meta["table_optimizer"] != cfg.optim.table_optimizer:
        raise ValueError(f"optim.table_optimizer={cfg.optim.table_optimizer!r} but checkpoint "
                         f"{str(path)!r} holds {meta['table_optimizer']!r} state: allowed is "
                         f"{meta['table_optimizer']!r}")
    same_layout = (meta["world_size"] == topo.world_size
                   and meta["zero_stage"] == cfg.train.zero_stage)
    # ZeRO 0 state is not partitioned: the engine checkpoint loads at any world size.
    if same_layout or meta["zero_stage"] == cfg.train.zero_stage == 0:
        engine.load_checkpoint(str(path), tag="dense", load_module_strict=True)
    else:
        load_dense_weights(engine, torch.load(path / "dense_full.pt", weights_only=True))
        if topo.rank == 0:
            warnings.warn(f"checkpoint {path.name} was written at world size "
                          f"{meta['world_size']}, ZeRO {meta['zero_stage']}; loading at "
                          f"{topo.world_size}, ZeRO {cfg.train.zero_stage}: dense weights "
                          "restored, dense optimizer state reinitialised", stacklevel=1)
    state = table_state(shards, table_opt, topo.mesh)
    dcp.load(state, checkpoint_id=str(path / "tables"))
    _restore_table_steps(shards, table_opt, state)
    rng_file = path / "rng" / f"rank_{topo.rank}.pt"
    if same_layout and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return int(meta["step"])


def _restore_table_steps(shards: list, table_opt: Any, state: dict[str, Any]) -> None:
    # Plain tensors load in place too, but the step counter is a 0-dim tensor: copy explicitly.
    for shard in shards:
        for side in ("u", "v"):
            key = f"{shard.name}.{side}.opt.step"
            if key in state:
                table_opt.init_state(getattr(shard, side))["step"].copy_(state[key])


def load_dense_weights(engine: Any, full: dict[str, torch.Tensor]) -> None:
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
        missing, unexpected = module.load_state_dict(full, strict=False)
        if unexpected or [m for m in missing if m in dict(module.named_parameters())]:
            raise KeyError(f"dense_full.pt does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    _refresh_master_weights(engine)


def _refresh_master_weights(engine: Any) -> None:
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

    out = dict(torch.load(path / "dense_full.pt", weights_only=True))
    reader = dcp.FileSystemReader(str(path / "tables"))
    md = reader.read_metadata()
    tables = {k: torch.empty(m.size, dtype=m.properties.dtype)
              for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(tables, storage_reader=reader, no_dist=True)
    out.update({f"tables.{k}": v for k, v in tables.items()})
    return out
