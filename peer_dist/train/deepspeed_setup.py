"""DeepSpeed for the dense parameters: config generated from ours, engine, and the dense half of
the global gradient-norm clip.

The expert shards never enter the engine (DeepSpeed would broadcast rank 0's shard, all-reduce
it, or partition it under ZeRO-3); they are stepped by RowSparseOptimizer. Clipping covers both:

    total = sqrt(|g_dense|^2 + |g_tables|^2),   factor = min(1, clip / (total + 1e-6))

DeepSpeed's own `gradient_clipping` stays 0 in the generated config. Before the boundary
`engine.step()` we read the engine's dense norm the way its optimizer will (per ZeRO stage) and
make the optimizer apply `factor`: at stage 0 (fp32) by scaling p.grad, at ZeRO 1-3 and under
DeepSpeed's bf16 optimizer by setting its `clip_grad` to factor * (norm + 1e-6), which its
step turns back into exactly `factor` (both divide by (norm + 1e-6) / clip_grad).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from peer_dist.config import Config
from peer_dist.errors import debug


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """train.dtype=auto: bf16 on CUDA, fp32 on CPU."""
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def bucket_elements(dense_params: int) -> int:
    """ZeRO's reduce / all-gather bucket size: the dense parameter count, at least 2^20 and at
    most DeepSpeed's default 5e8 elements."""
    return int(min(5e8, max(dense_params, 1 << 20)))


def deepspeed_config(cfg: Config, dtype: torch.dtype, dense_params: int = 0) -> dict[str, Any]:
    """The one DeepSpeed config, generated from ours (users never edit a second JSON).

    ZeRO's buckets are sized to the dense part (at least 2^20, at most DeepSpeed's default
    5e8 elements): a default-size reduction bucket alone holds 1-2 GB of GPU memory, far more
    than a PEER model's dense gradients need."""
    t = cfg.train
    bucket = bucket_elements(dense_params)
    zero: dict[str, Any] = {"stage": t.zero_stage, "reduce_bucket_size": bucket,
                            "allgather_bucket_size": bucket}
    if t.zero_stage == 3:
        # Small dense models: gather whole modules instead of prefetching parameter buckets.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "gradient_clipping": 0.0,  # we clip dense + table gradients together (module docstring)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def dense_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """torch AdamW (no compiled op needed; works with every ZeRO stage on CPU and GPU)."""
    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every engine detail at INFO; keep warnings only."""
    import logging

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # ZeRO's gathers and reduce-scatters call collectives torch deprecates for their *_single
    # forms (DeepSpeed's calls; this project makes none): lines per rank and run that no
    # user setting can act on
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\."
                            r"(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Hold back what a third-party call prints (shown on failure, or with PEER_DEBUG=1)."""
    if debug():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


# torch waits without end on a compiled op's lock file; DeepSpeed's CPU op compiles in under a
# minute, so a lock this old was left by a build that was killed
STALE_LOCK_S = 600.0


def clear_stale_build_lock(name: str = "deepspeed_shm_comm") -> bool:
    """Remove the op's build lock if a killed build left it (older than STALE_LOCK_S), saying so
    in one line; every later run would otherwise wait on it silently. True if removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.stat(lock).st_mtime
        if age <= STALE_LOCK_S:
            return False
        os.unlink(lock)  # one rank succeeds; the others find it gone
    except OSError:
        return False
    print(f"peer-train: removed {lock}, left {age / 60:.0f} min ago by a build of DeepSpeed's "
          "CPU op that did not finish (it takes under a minute)", file=sys.stderr, flush=True)
    return True


def build_engine(model: torch.nn.Module, cfg: Config, dtype: torch.dtype) -> Any:
    """deepspeed.initialize over the dense parameters only (the shards are not parameters)."""
    quiet_deepspeed()
    import deepspeed

    if dist.get_backend() == "gloo":  # the CPU op is built and loaded under a lock
        clear_stale_build_lock()

    with quiet_stdout():  # "DeepSpeed ... shm_comm_op built successfully", once per rank
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=dense_optimizer(params, cfg), model_parameters=params,
        config=deepspeed_config(cfg, dtype, sum(p.numel() for p in params)))
    return engine


def set_lr(engine: Any, lr: float) -> None:
    """The dense learning rate for the next step (the schedule is ours, not DeepSpeed's)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    basic = getattr(engine, "basic_optimizer", None)
    if basic is not None and basic is not engine.optimizer:
        for group in basic.param_groups:
            group["lr"] = lr


# --------------------------------------------------------------------------- clipping

def _bf16_optimizer_type() -> type | None:
    try:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    except ImportError:  # pragma: no cover - older DeepSpeed
        return None
    return BF16_Optimizer


def dense_grad_norm(engine: Any) -> float:
    """L2 norm of the dense gradients the boundary engine.step() is about to apply.

    Call after the last micro-batch's engine.backward(): by then DeepSpeed has averaged the
    gradients over the data-parallel ranks (all-reduce at stage 0, reduce-scatter into the
    partitions at ZeRO 1-3). Every rank gets the same value.
    """
    norm = _dense_grad_norm(engine)
    # DeepSpeed's norm helpers report a NaN or inf norm as -1: make it non-finite again.
    return norm if norm >= 0 else float("nan")


def _dense_grad_norm(engine: Any) -> float:
    opt, stage = engine.optimizer, engine.zero_optimization_stage()
    if stage in (1, 2):
        return float(opt.scaled_global_norm()) / float(opt.loss_scale)
    if stage == 3:
        norms = torch.stack([torch.as_tensor(n, dtype=torch.float64).reshape(())
                             for n in opt._get_norm_groups()])
        if bool((norms < 0).any()):
            return float("nan")
        return float(torch.linalg.vector_norm(norms)) / float(opt.loss_scale)
    bf16 = _bf16_optimizer_type()
    if bf16 is not None and isinstance(opt, bf16):
        from deepspeed.runtime.utils import get_global_norm_of_tensors

        grads, _ = opt.get_grads_for_norm()
        return float(get_global_norm_of_tensors(grads))
    sq = sum(float(p.grad.double().pow(2).sum()) for p in engine.module.parameters()
             if p.grad is not None)
    return math.sqrt(sq)


def nonfinite_dense_param(engine: Any) -> str:
    """The first dense parameter with a non-finite gradient, where the gradients are whole
    (ZeRO 0); under ZeRO 1-3 they are partitioned, and this says so."""
    if engine.zero_optimization_stage() != 0:
        return f"partitioned by ZeRO {engine.zero_optimization_stage()}"
    for name, p in engine.module.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name
    return "parameter not found"


def torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer handed to deepspeed.initialize (ZeRO wraps it)."""
    return engine.basic_optimizer


def apply_dense_clip(engine: Any, factor: float, dense_norm: float) -> None:
    """Make the next boundary engine.step() scale the dense gradients by `factor` (<= 1)."""
    opt = engine.optimizer
    if hasattr(opt, "clip_grad"):  # ZeRO 1-3 and BF16_Optimizer clip inside their step
        opt.clip_grad = factor * (dense_norm + 1e-6) if factor < 1.0 else 0.0
        return
    if factor < 1.0:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)


def clip_factor(clip: float, dense_norm: float, table_sq_norm: float) -> tuple[float, float]:
    """(total norm, scale factor); clip=0 turns clipping off (factor 1)."""
    total = math.sqrt(dense_norm ** 2 + table_sq_norm)
    if clip <= 0 or not math.isfinite(total):
        return total, 1.0
    return total, min(1.0, clip / (total + 1e-6))
