"""peer-scale: scaling studies of expert-table memory per rank.

  peer-scale predict --num-experts 65536,262144,1048576 --dim 256,1024 --ep 1,2,4,8 \\
                     --world-size 8 --out runs/scale/predict
  peer-scale measure --config configs/tiny.yaml --num-experts 16384,65536,262144,1048576 \
                     --dim 64 --ep 1,2,4 --steps 5 --out runs/scale/measure
  peer-scale plan --nodes 2 --gpus-per-node 8 --gpu-mem-gib 80 --num-experts 1048576 --dim 1024

predict and measure write DIR/table.md, DIR/table.csv, DIR/plot.png and TensorBoard scalars
under DIR/tb (step = number of experts); --json prints one JSON object per point and line.
The arithmetic lives in memory_model.py; measure launches the real trainer (peer-train) under
torchrun and reads the per-rank memory it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from peer_dist import cli
from peer_dist.config import TABLE_DTYPES, ConfigError, ModelConfig, load_config
from peer_dist.errors import folder_error
from peer_dist.tools import memory_model as mm
from peer_dist.tools.cluster_model import MAX_GPUS  # world size, nodes x GPUs, EP
from peer_dist.tools.plots import Series, line_chart, predicted_vs_measured

GIB = 1024 ** 3
OPTIMIZER_RANK = {"lazy_adam": 0, "dense_adam": 1, "adagrad": 2, "sgd": 3}  # plan: best first

# Row keys: the setup of a point, then predict's byte counts (per rank).
SETUP_KEYS = ("num_experts", "dim", "layers", "ep", "world_size", "dtype", "table_dtype",
              "table_optimizer", "zero_stage", "strategy", "tokens_per_rank", "heads", "topk",
              "device")
PREDICT_KEYS = ("expert_params", "expert_optim", "expert_grads", "dense", "activations", "a2a",
                "runtime", "expert_bytes_per_rank_predicted", "total_bytes_per_rank_predicted",
                "peak_bytes_per_rank_predicted", "a2a_bytes_moved_predicted")


# --------------------------------------------------------------------------- arguments

class UserExit(SystemExit):
    """A user error (a bad value, file or combination of flags): main prints its one line on
    stderr and the process exits with status 2, as for a bad flag. A run that fails or hangs
    stays a plain SystemExit (status 1)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


# Bounds of the flags: beyond them a value is a typo (or hangs the planner: every EP of the
# world is priced, in time that grows with the world), not a setting.
MAX_EXPERTS = cli.MAX_COUNT
MAX_DIM = 1 << 20
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_TOPK = 1 << 20  # and at most sqrt(N): the config's check
MAX_SEQUENCES = 1 << 20  # plan --micro-batch
MAX_GPU_MEM_GIB = 1 << 20
MAX_TIMEOUT_S = 1_000_000  # subprocess waits take at most ~2.1e6 s (milliseconds in a C int)


SQUARE = f"a perfect square > 0 (N = n*n), e.g. 65536 or 1048576, up to {MAX_EXPERTS}"


def _is_square(text: str) -> bool:
    try:
        n = int(text)
    except ValueError:
        return False
    return 1 <= n <= MAX_EXPERTS and math.isqrt(n) ** 2 == n


def _square(text: str) -> int:
    """An argparse type: a number of experts N, a perfect square (N = n*n) in [1,
    MAX_EXPERTS]: the config's check of model.peer.num_experts, on the flag."""
    if not _is_square(text):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is {SQUARE}")
    return int(text)


def _squares(text: str) -> list[int]:
    """An argparse type: comma-separated numbers of experts (see _square), at least one."""
    items = cli.items(text)
    if not items or not all(map(_is_square, items)):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is {SQUARE}, "
                                         "comma-separated")
    return [int(v) for v in items]


def _fraction(text: str) -> float:
    """An argparse type: a fraction in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is a fraction >= 0 and "
                                         "< 1, e.g. 0.05")
    return value


# Grid flags and their defaults when a grid is given on the command line (predict, and measure
# with some grid flag; measure with none measures VALIDATION_GRID, calibrate CALIBRATION_GRID).
GRID_DEFAULTS = {
    "predict": dict(num_experts=[65536, 262144, 1048576], dim=[256, 1024], ep=[1, 2, 4, 8]),
    "measure": dict(num_experts=[4096, 16384], dim=[64], ep=[1, 2],
                    tokens_per_rank=[128, 1024, 4096]),
}
GRID_FLAGS = ("num_experts", "dim", "layers", "ep", "world_size", "dtype", "table_dtype",
              "table_optimizer", "zero_stage", "strategy", "tokens_per_rank", "heads", "topk")


def _grid_args(p: argparse.ArgumentParser, measure: bool) -> None:
    p.add_argument("--config", default=None, help="base YAML config (model shape, batch)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the base config, e.g. model.n_layers=2 (repeatable)")
    defaults = GRID_DEFAULTS["measure" if measure else "predict"]
    p.add_argument("--num-experts", type=_squares, default=None,
                   help=f"N values (perfect squares); default {defaults['num_experts']}")
    p.add_argument("--dim", type=cli.int_list(1, MAX_DIM), default=None,
                   help=f"default {defaults['dim']}")
    p.add_argument("--layers", type=cli.int_list(1, MAX_LAYERS), default=None,
                   help="PEER layers (middle blocks); default: the config's peer_blocks")
    p.add_argument("--ep", type=cli.int_list(0, MAX_GPUS), default=None,
                   help=f"default {defaults['ep']}; 0: the whole world (with --world-size)")
    p.add_argument("--world-size", type=cli.int_list(1, MAX_GPUS), default=None,
                   help="ranks; default: each point's EP (one expert-parallel group)")
    p.add_argument("--heads", type=cli.int_list(1, MAX_HEADS), default=None,
                   help="PEER heads; default: the config's")
    p.add_argument("--topk", type=cli.int_list(1, MAX_TOPK), default=None,
                   help="experts per head; default: the config's")
    p.add_argument("--dtype", type=cli.names(list(mm.DTYPE_BYTES)), default=None,
                   help="fp32 | bf16: dense part, activations and messages (default fp32)")
    p.add_argument("--table-dtype", type=cli.names(TABLE_DTYPES), default=None,
                   help=f"any of {list(TABLE_DTYPES)}: expert tables (model.peer.table_dtype; "
                        "default: the config's)")
    p.add_argument("--table-state-dtype", default="fp32", choices=sorted(mm.DTYPE_BYTES),
                   help="the table optimizer's state (optim.table_state_dtype)")
    p.add_argument("--table-optimizer", type=cli.names(mm.TABLE_OPTIMIZERS), default=None,
                   help=f"any of {list(mm.TABLE_OPTIMIZERS)} (default lazy_adam)")
    p.add_argument("--zero-stage", type=cli.int_list(min(mm.ZERO_STAGES), max(mm.ZERO_STAGES)),
                   default=None, help="default 0")
    p.add_argument("--strategy", type=cli.names(mm.STRATEGIES), default=None,
                   help=f"any of {list(mm.STRATEGIES)} (default dispatch)")
    p.add_argument("--tokens-per-rank", type=cli.int_list(1, cli.MAX_COUNT), default=None,
                   help="tokens per rank per micro-batch (rounded to whole sequences); "
                        "default batch_size * seq_len" + (", 128, 1024, 4096 for measure"
                                                          if measure else ""))
    p.add_argument("--runtime-bytes", type=cli.ints(0, cli.MAX_COUNT), default=None,
                   help="the runtime's own bytes per rank; default: the calibration's, else "
                        "measured by a minimal training run and cached" if measure else
                        "the runtime's own bytes per rank (default 0; peer-scale measure and "
                        "plan --check measure it)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="constants written by peer-scale calibrate (default: the last "
                        "calibration of this machine, else the stored CPU constants)")
    if not measure:
        p.add_argument("--device", default="cuda", choices=mm.DEVICES,
                       help="what the prediction is for (measure uses this machine's)")
        p.add_argument("--gpu-mem-gib", type=cli.floats(0, MAX_GPU_MEM_GIB, above=True),
                       default=None, help="draw this device memory (GiB) as a line in plot.png")
    p.add_argument("--out", default=None, help="output folder (table.md, table.csv, plot.png, tb/)")
    p.add_argument("--json", action="store_true", help="print one JSON object per point")


def fill_grid_defaults(args: argparse.Namespace, command: str) -> None:
    """Unset grid flags take the command's defaults (GRID_DEFAULTS; a list of None: the
    config's value)."""
    common = dict(dtype=["fp32"], table_optimizer=["lazy_adam"], zero_stage=[0],
                  strategy=["dispatch"])
    for key, value in {**common, **GRID_DEFAULTS[command]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _run_args(p: argparse.ArgumentParser) -> None:
    """What measure and calibrate need to launch the trainer."""
    p.add_argument("--steps", type=cli.ints(1, cli.MAX_COUNT), default=3,
                   help="optimizer steps per run")
    p.add_argument("--timeout", type=cli.floats(0, MAX_TIMEOUT_S, above=True), default=600.0,
                   help="seconds per run")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's folder")
    p.add_argument("--data-bytes", type=cli.ints(1, cli.MAX_COUNT), default=2_000_000,
                   help="raw text bytes to prepare when the data folder does not exist yet")
    p.add_argument("--data", default=None,
                   help="prepared data folder for the runs (default: OUT/data, made on first use)")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="peer-scale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _grid_args(sub.add_parser("predict", help="memory model over a grid"), measure=False)
    m = sub.add_parser("measure", help="short torchrun runs of peer-train over a grid "
                       "(no grid flags: the validation grid)")
    _grid_args(m, measure=True)
    _run_args(m)
    m.add_argument("--grid", default=None, choices=sorted(NAMED_GRIDS),
                   help="a named grid instead of grid flags (default, with no grid flags: "
                        "validation)")
    c = sub.add_parser("calibrate", help="fit the measured constants (runtime, selection "
                       "scratch) on the calibration grid (or the grid flags) and store them")
    _grid_args(c, measure=True)
    _run_args(c)
    c.add_argument("--refit", default=None, metavar="FILE",
                   help="fit again the measurements stored in an earlier calibration.json of "
                        "the same grid instead of running it")
    _plan_args(sub.add_parser("plan", help="settings that fit a cluster, best first"))
    return parser


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=cli.ints(1, MAX_GPUS), default=None,
                   help="nodes of the cluster (or --min-gpus to find how many are needed)")
    p.add_argument("--gpus-per-node", type=cli.ints(1, MAX_GPUS), default=None)
    p.add_argument("--cluster", default=None, metavar="NODESxGPUS:KIND|YAML",
                   help="rank EP x DP layouts and strategies by the step-time model's tokens/s "
                        "per GPU (KIND h100, h200 or a100; or a YAML of the cluster's numbers)")
    p.add_argument("--min-gpus", action="store_true",
                   help="the fewest GPUs (1 .. --gpus-per-node, then whole nodes) on which the "
                        "model fits, and the best layout there")
    p.add_argument("--max-gpus", type=cli.ints(1, MAX_GPUS), default=4096,
                   help="--min-gpus: the largest tried")
    p.add_argument("--table-optimizer", type=cli.names(mm.TABLE_OPTIMIZERS), default=None,
                   metavar="NAMES",
                   help=f"consider only these table optimizers (comma-separated, of "
                        f"{','.join(mm.TABLE_OPTIMIZERS)}; default: all)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write DIR/plan.md and DIR/plan.png (per-rank memory against EP, "
                        "or against GPUs with --min-gpus, and the GPU's capacity)")
    p.add_argument("--gpu-mem-gib", type=cli.floats(0, MAX_GPU_MEM_GIB, above=True),
                   default=None, help="memory per GPU, GiB")
    p.add_argument("--headroom", type=_fraction, default=0.05,
                   help="fraction of memory that must stay free beyond the predicted peak")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--num-experts", type=_square, default=None)
    p.add_argument("--dim", type=cli.ints(1, MAX_DIM), default=None)
    p.add_argument("--layers", type=cli.ints(1, MAX_LAYERS), default=None)
    p.add_argument("--dtype", default="bf16", choices=sorted(mm.DTYPE_BYTES))
    p.add_argument("--table-dtype", default=None, choices=TABLE_DTYPES,
                   help="expert tables (model.peer.table_dtype; default: the config's)")
    p.add_argument("--table-state-dtype", default="fp32", choices=sorted(mm.DTYPE_BYTES))
    p.add_argument("--strategy", default="dispatch", choices=mm.STRATEGIES)
    p.add_argument("--micro-batch", type=cli.int_list(1, MAX_SEQUENCES),
                   default=[1, 2, 4, 8, 16, 32],
                   help="sequences per rank per micro-batch to consider")
    p.add_argument("--runtime-bytes", type=cli.ints(0, cli.MAX_COUNT), default=None,
                   help="the runtime's own bytes per GPU (CUDA context and allocator pools "
                        "beyond the model's terms; default 0); --check measures it here")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="constants from peer-scale calibrate (on CUDA: launch/gpu_check.sh)")
    p.add_argument("--top", type=cli.ints(1), default=20, help="rows to print")
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="run the best setting here for a few steps (nodes x GPUs ranks) and "
                        "print predicted against measured")
    p.add_argument("--steps", type=cli.ints(1, cli.MAX_COUNT), default=3,
                   help="--check: optimizer steps")
    p.add_argument("--timeout", type=cli.floats(0, MAX_TIMEOUT_S, above=True), default=600.0,
                   help="--check: seconds")
    p.add_argument("--data-bytes", type=cli.ints(1, cli.MAX_COUNT), default=2_000_000,
                   help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help="--check: prepared data folder")
    p.add_argument("--keep-runs", action="store_true", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- grid

def model_for(base: ModelConfig, num_experts: int, dim: int, layers: int | None,
              heads: int | None = None, topk: int | None = None) -> ModelConfig:
    """A copy of `base` with N experts, model dim d and `layers` PEER blocks in the middle
    (and, when given, PEER heads and top-k)."""
    m = copy.deepcopy(base)
    m.dim, m.peer.num_experts = dim, num_experts
    m.peer.heads, m.peer.topk = heads or m.peer.heads, topk or m.peer.topk
    if layers is not None:
        m.n_layers = max(m.n_layers, layers)
        start = (m.n_layers - layers) // 2
        m.peer_blocks = ",".join(str(i) for i in range(start, start + layers)) or "none"
    m.validate()
    return m


def base_config(args: argparse.Namespace):
    try:
        return load_config(args.config, args.set)
    except ConfigError as err:
        raise UserExit(f"peer-scale: {err}") from err


@dataclass(frozen=True)
class Point:
    """One point of a named grid (the default config otherwise; fp32 dense part, lazy Adam)."""

    n: int
    d: int
    ep: int
    world: int
    zero: int
    tokens: int
    heads: int
    topk: int
    table_dtype: str = "fp32"
    strategy: str = "dispatch"

    def __post_init__(self) -> None:  # a grid typo fails at import, not after an hour of runs
        assert self.table_dtype in TABLE_DTYPES and self.strategy in mm.STRATEGIES, self


def _tiny(world: int, zero: int) -> Point:
    """The calibration's runtime point of a group: 16^2 experts, one sequence per rank."""
    return Point(256, 64, 1, world, zero, 128, 8, 16)


# Calibration: each runtime group (world 1 and 2 x ZeRO 0-3) by a minimal run, and the scratch
# per token and per selection of each kind (local, dispatch, fetch) by large-batch points
# (N = 4096, d = 64, 32 and 128 selections per token).
CALIBRATION_GRID = tuple(_tiny(w, z) for w in (1, 2) for z in range(4)) + (
    Point(4096, 64, 1, 1, 0, 4096, 8, 16), Point(4096, 64, 1, 2, 2, 4096, 8, 16),
    Point(4096, 64, 1, 1, 0, 4096, 4, 8),
    Point(4096, 64, 2, 2, 0, 4096, 8, 16), Point(4096, 64, 2, 2, 3, 2048, 8, 16),
    Point(4096, 64, 2, 2, 0, 4096, 4, 8),
    Point(4096, 64, 2, 2, 1, 4096, 8, 16, strategy="fetch"),
    Point(4096, 64, 2, 2, 2, 4096, 4, 8, strategy="fetch"),
    # N = 65,536, where a rank fetches only part of the rows (R < N) and DP replicas' touched
    # rows differ: fetch's buffers and the DP sum of row gradients at a size they matter
    Point(65536, 64, 2, 2, 0, 2048, 8, 16, strategy="fetch"),
    Point(65536, 64, 1, 2, 0, 2048, 8, 16),
    # the routing law's small token counts (256 and 1,024 tokens a step; the points above have
    # 4,096 and 8,192): how fast distinct queries grow with the tokens
    Point(65536, 64, 1, 1, 0, 256, 8, 16), Point(65536, 64, 1, 1, 1, 1024, 4, 8),
    Point(65536, 64, 1, 2, 2, 512, 8, 8))

# Validation: N, d and tokens per rank that no calibration point has (N = 208^2 to 432^2;
# d = 48, 96, 136; 768 to 2,176 tokens), 32 to 128 selections per token (4 to 16 heads), EP 1
# on 1 and 2 ranks and EP 2, ZeRO 0-3, fp32 and bf16 tables, dispatch and fetch. No point of
# it is in CALIBRATION_GRID or in an earlier validation grid (tests/unit/test_memory_model.py
# checks): a grid whose errors have been looked at no longer validates.
VALIDATION_GRID = (
    Point(43264, 48, 1, 1, 0, 768, 8, 8), Point(43264, 136, 1, 1, 2, 2176, 4, 16, "bf16"),
    Point(73984, 96, 1, 1, 1, 1408, 8, 16), Point(73984, 48, 1, 1, 3, 2176, 16, 8),
    Point(135424, 136, 1, 1, 0, 1408, 4, 8, "bf16"), Point(135424, 96, 1, 1, 2, 2176, 8, 8),
    Point(186624, 48, 1, 1, 1, 1408, 8, 16, "bf16"), Point(186624, 136, 1, 1, 3, 768, 8, 8),
    Point(43264, 96, 1, 2, 0, 2176, 8, 16), Point(73984, 136, 1, 2, 2, 1408, 8, 8, "bf16"),
    Point(135424, 48, 1, 2, 1, 2176, 4, 16), Point(186624, 96, 1, 2, 3, 1408, 8, 8),
    Point(43264, 48, 1, 2, 3, 768, 16, 8, "bf16"),
    Point(43264, 136, 2, 2, 1, 1408, 8, 16), Point(73984, 48, 2, 2, 0, 2176, 8, 8, "bf16"),
    Point(135424, 96, 2, 2, 3, 2176, 8, 16), Point(186624, 136, 2, 2, 2, 1408, 4, 8),
    Point(73984, 96, 2, 2, 1, 768, 16, 8),
    Point(43264, 96, 2, 2, 2, 2176, 8, 8, strategy="fetch"),
    Point(73984, 136, 2, 2, 3, 2176, 8, 16, strategy="fetch"),
    Point(135424, 48, 2, 2, 0, 1408, 8, 16, "bf16", "fetch"),
    Point(186624, 96, 2, 2, 1, 2176, 4, 8, strategy="fetch"),
    Point(135424, 136, 2, 2, 2, 768, 8, 8, strategy="fetch"),
    Point(186624, 48, 2, 2, 0, 2176, 8, 16, "bf16", "fetch"))

# Earlier validation grids, kept so that a new one can be checked disjoint from them: the
# 28 points (N = 128^2 to 512^2, d = 32, 96, 128) whose errors led to the query-BN, grad-sync
# and fetch terms, and the three below.
PAST_VALIDATION_GRIDS = ((
    Point(16384, 32, 1, 1, 0, 256, 4, 8), Point(16384, 96, 1, 1, 1, 1024, 8, 8, "bf16"),
    Point(16384, 128, 1, 1, 2, 2048, 8, 16), Point(16384, 96, 1, 1, 3, 2048, 4, 8),
    Point(65536, 32, 1, 1, 0, 2048, 8, 16, "bf16"), Point(65536, 96, 1, 1, 2, 256, 8, 8),
    Point(65536, 128, 1, 1, 1, 1024, 4, 8), Point(262144, 32, 1, 1, 3, 1024, 8, 16),
    Point(262144, 96, 1, 1, 0, 2048, 8, 8, "bf16"),
    Point(262144, 128, 1, 1, 2, 256, 8, 16, "bf16"), Point(65536, 32, 1, 1, 0, 1024, 16, 8),
    Point(16384, 32, 1, 2, 1, 2048, 8, 16), Point(65536, 128, 1, 2, 0, 1024, 8, 8, "bf16"),
    Point(262144, 96, 1, 2, 3, 256, 4, 8), Point(16384, 128, 2, 2, 0, 256, 8, 8),
    Point(16384, 96, 2, 2, 2, 2048, 8, 16, "bf16"), Point(65536, 32, 2, 2, 1, 1024, 4, 8),
    Point(65536, 96, 2, 2, 3, 2048, 8, 16), Point(262144, 32, 2, 2, 0, 2048, 8, 8),
    Point(262144, 128, 2, 2, 2, 1024, 8, 16), Point(262144, 96, 2, 2, 1, 256, 8, 16, "bf16"),
    Point(16384, 32, 2, 2, 3, 1024, 8, 8, "bf16", "fetch"),
    Point(16384, 128, 2, 2, 0, 2048, 4, 8, strategy="fetch"), Point(65536, 96, 2, 2, 2, 1024, 8, 16,
                                                          strategy="fetch"),
    Point(65536, 128, 2, 2, 1, 256, 8, 8, strategy="fetch"),
    Point(262144, 32, 2, 2, 2, 2048, 8, 16, "bf16", "fetch"),
    Point(262144, 96, 2, 2, 0, 1024, 4, 8, strategy="fetch"),
    Point(262144, 128, 2, 2, 3, 2048, 8, 8, strategy="fetch")), (
    # the 24 points (N = 192^2 to 448^2, d = 48, 80, 112) that validated the model under
    # uniform routing; their counted rows led to the routing law
    Point(36864, 48, 1, 1, 0, 768, 8, 8), Point(36864, 112, 1, 1, 2, 1536, 4, 16, "bf16"),
    Point(102400, 80, 1, 1, 1, 384, 8, 16), Point(102400, 48, 1, 1, 3, 1536, 16, 8),
    Point(147456, 112, 1, 1, 0, 768, 4, 8, "bf16"), Point(147456, 80, 1, 1, 2, 1536, 8, 8),
    Point(200704, 48, 1, 1, 1, 768, 8, 16, "bf16"), Point(200704, 112, 1, 1, 3, 384, 8, 8),
    Point(36864, 80, 1, 2, 0, 1536, 8, 16), Point(102400, 112, 1, 2, 2, 768, 8, 8, "bf16"),
    Point(147456, 48, 1, 2, 1, 1536, 4, 16), Point(200704, 80, 1, 2, 3, 768, 8, 8),
    Point(36864, 48, 1, 2, 3, 384, 16, 8, "bf16"),
    Point(36864, 112, 2, 2, 1, 768, 8, 16), Point(102400, 48, 2, 2, 0, 1536, 8, 8, "bf16"),
    Point(147456, 80, 2, 2, 3, 1536, 8, 16), Point(200704, 112, 2, 2, 2, 768, 4, 8),
    Point(102400, 80, 2, 2, 1, 384, 16, 8),
    Point(36864, 80, 2, 2, 2, 1536, 8, 8, strategy="fetch"),
    Point(102400, 112, 2, 2, 3, 1536, 8, 16, strategy="fetch"),
    Point(147456, 48, 2, 2, 0, 768, 8, 16, "bf16", "fetch"),
    Point(200704, 80, 2, 2, 1, 1536, 4, 8, strategy="fetch"),
    Point(147456, 112, 2, 2, 2, 384, 8, 8, strategy="fetch"),
    Point(200704, 48, 2, 2, 0, 1536, 8, 16, "bf16", "fetch")), (
    # the 24 points (N = 176^2 to 416^2, d = 40, 72, 104) that validated the routing law and
    # the heap policy; their one-rank misses led to the two backward peaks (activation_bytes)
    Point(30976, 40, 1, 1, 0, 512, 8, 8), Point(30976, 104, 1, 1, 2, 2048, 4, 16, "bf16"),
    Point(82944, 72, 1, 1, 1, 1024, 8, 16), Point(82944, 40, 1, 1, 3, 2048, 16, 8),
    Point(123904, 104, 1, 1, 0, 1024, 4, 8, "bf16"), Point(123904, 72, 1, 1, 2, 2048, 8, 8),
    Point(173056, 40, 1, 1, 1, 1024, 8, 16, "bf16"), Point(173056, 104, 1, 1, 3, 512, 8, 8),
    Point(30976, 72, 1, 2, 0, 2048, 8, 16), Point(82944, 104, 1, 2, 2, 1024, 8, 8, "bf16"),
    Point(123904, 40, 1, 2, 1, 2048, 4, 16), Point(173056, 72, 1, 2, 3, 1024, 8, 8),
    Point(30976, 40, 1, 2, 3, 512, 16, 8, "bf16"),
    Point(30976, 104, 2, 2, 1, 1024, 8, 16), Point(82944, 40, 2, 2, 0, 2048, 8, 8, "bf16"),
    Point(123904, 72, 2, 2, 3, 2048, 8, 16), Point(173056, 104, 2, 2, 2, 1024, 4, 8),
    Point(82944, 72, 2, 2, 1, 512, 16, 8),
    Point(30976, 72, 2, 2, 2, 2048, 8, 8, strategy="fetch"),
    Point(82944, 104, 2, 2, 3, 2048, 8, 16, strategy="fetch"),
    Point(123904, 40, 2, 2, 0, 1024, 8, 16, "bf16", "fetch"),
    Point(173056, 72, 2, 2, 1, 2048, 4, 8, strategy="fetch"),
    Point(123904, 104, 2, 2, 2, 512, 8, 8, strategy="fetch"),
    Point(173056, 40, 2, 2, 0, 2048, 8, 16, "bf16", "fetch")), (
    # the 24 points (N = 224^2 to 464^2, d = 56, 88, 120) that validated the two backward
    # peaks; their under-counted rows on two ranks and at large N led to the law's W and N
    Point(50176, 56, 1, 1, 0, 640, 8, 8), Point(50176, 120, 1, 1, 2, 1920, 4, 16, "bf16"),
    Point(92416, 88, 1, 1, 1, 1152, 8, 16), Point(92416, 56, 1, 1, 3, 1920, 16, 8),
    Point(160000, 120, 1, 1, 0, 1152, 4, 8, "bf16"), Point(160000, 88, 1, 1, 2, 1920, 8, 8),
    Point(215296, 56, 1, 1, 1, 1152, 8, 16, "bf16"), Point(215296, 120, 1, 1, 3, 640, 8, 8),
    Point(50176, 88, 1, 2, 0, 1920, 8, 16), Point(92416, 120, 1, 2, 2, 1152, 8, 8, "bf16"),
    Point(160000, 56, 1, 2, 1, 1920, 4, 16), Point(215296, 88, 1, 2, 3, 1152, 8, 8),
    Point(50176, 56, 1, 2, 3, 640, 16, 8, "bf16"),
    Point(50176, 120, 2, 2, 1, 1152, 8, 16), Point(92416, 56, 2, 2, 0, 1920, 8, 8, "bf16"),
    Point(160000, 88, 2, 2, 3, 1920, 8, 16), Point(215296, 120, 2, 2, 2, 1152, 4, 8),
    Point(92416, 88, 2, 2, 1, 640, 16, 8),
    Point(50176, 88, 2, 2, 2, 1920, 8, 8, strategy="fetch"),
    Point(92416, 120, 2, 2, 3, 1920, 8, 16, strategy="fetch"),
    Point(160000, 56, 2, 2, 0, 1152, 8, 16, "bf16", "fetch"),
    Point(215296, 88, 2, 2, 1, 1920, 4, 8, strategy="fetch"),
    Point(160000, 120, 2, 2, 2, 640, 8, 8, strategy="fetch"),
    Point(215296, 56, 2, 2, 0, 1920, 8, 16, "bf16", "fetch")))

NAMED_GRIDS = {"calibration": CALIBRATION_GRID, "validation": VALIDATION_GRID}


def named_grid(name: str, args: argparse.Namespace) -> list[mm.Setup]:
    """A named grid's points on the base config."""
    cfg = base_config(args)
    seq = cfg.train.seq_len
    return [_setup(args, cfg, model_for(cfg.model, p.n, p.d, None, p.heads, p.topk), p.ep,
                   p.world, "fp32", p.table_dtype, "lazy_adam", p.zero, p.strategy,
                   max(1, p.tokens // seq) * seq) for p in NAMED_GRIDS[name]]


def _setup(args: argparse.Namespace, cfg, model: ModelConfig, ep: int, world: int, dtype: str,
           table_dtype: str, opt: str, zero: int, strategy: str, tokens: int) -> mm.Setup:
    try:
        return mm.Setup(model, ep=ep, world_size=world, dtype=dtype, table_dtype=table_dtype,
                        table_optimizer=opt, zero_stage=zero,
                        table_state_dtype=args.table_state_dtype, strategy=strategy,
                        tokens_per_rank=tokens, runtime_bytes=args.runtime_bytes or 0,
                        device=getattr(args, "device", None) or local_device()).validate()
    except (ValueError, ConfigError) as err:
        raise UserExit(f"peer-scale: {err}") from err


def _csv(values: list) -> str:
    return ",".join(map(str, values))


def grid(args: argparse.Namespace) -> list[mm.Setup]:
    """Every combination of the grid flags; points whose EP does not divide the world size are
    skipped."""
    cfg = base_config(args)
    seq = cfg.train.seq_len
    token_list = args.tokens_per_rank or [cfg.train.batch_size * seq]
    if min(args.ep) < 0 or min(args.world_size or [1]) < 1 or (
            0 in args.ep and not args.world_size):
        raise UserExit(f"peer-scale {args.command}: --ep={_csv(args.ep)} --world-size="
                       f"{_csv(args.world_size or []) or '(none)'}: allowed are --ep >= 1, or 0 "
                       "(the whole world) with --world-size, and --world-size >= 1")
    points = []
    for n, d, layers, ep, world, dtype, tdt, opt, zero, strat, tokens, heads, topk in \
            itertools.product(args.num_experts, args.dim, args.layers or [None], args.ep,
                              args.world_size or [None], args.dtype,
                              args.table_dtype or [cfg.model.peer.table_dtype],
                              args.table_optimizer, args.zero_stage, args.strategy, token_list,
                              args.heads or [None], args.topk or [None]):
        world = world or ep
        ep = ep or world  # 0: the whole world, as parallel.ep=0
        if world % ep:
            continue
        try:
            model = model_for(cfg.model, n, d, layers, heads, topk)
        except ConfigError as err:  # e.g. a top-k above sqrt(N), a d the attention heads split
            given = [f"--{k}={v}" for k, v in (("num-experts", n), ("dim", d), ("layers", layers),
                                               ("heads", heads), ("topk", topk)) if v]
            raise UserExit(f"peer-scale {args.command}: the point {' '.join(given)}: {err}"
                           ) from err
        points.append(_setup(args, cfg, model, ep, world, dtype, tdt, opt, zero, strat,
                             max(1, tokens // seq) * seq))
    if not points:
        raise UserExit(f"peer-scale {args.command}: --ep={_csv(args.ep)} --world-size="
                       f"{_csv(args.world_size)}: no EP divides a world size, the grid is empty; "
                       "allowed: an --ep that divides a --world-size (or 0: the whole world)")
    return points


def local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_row(s: mm.Setup) -> dict:
    return {"num_experts": s.n, "dim": s.d, "layers": s.layers, "ep": s.ep,
            "world_size": s.world_size, "dtype": s.dtype, "table_dtype": s.table_dtype,
            "table_optimizer": s.table_optimizer, "table_state_dtype": s.table_state_dtype,
            "zero_stage": s.zero_stage, "strategy": s.strategy,
            "tokens_per_rank": s.tokens_per_rank, "heads": s.model.peer.heads,
            "topk": s.model.peer.topk, "device": s.device}


def predict_row(s: mm.Setup) -> dict:
    b = mm.breakdown(s)
    row = setup_row(s)
    row.update({k: b[k] for k in mm.COMPONENTS})
    row["expert_bytes_per_rank_predicted"] = b["expert_tables"]
    row["total_bytes_per_rank_predicted"] = b["total"] - b["runtime"]  # the model's terms
    row["peak_bytes_per_rank_predicted"] = b["total"]  # the whole peak, runtime included
    row["a2a_bytes_moved_predicted"] = mm.a2a_bytes_moved(s)
    row["scratch_bytes"] = int(s.tokens_per_rank * mm.selection_scratch(s))  # in activations
    return row


# --------------------------------------------------------------------------- outputs

def human(v: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(v) >= size:
            return f"{v / size:.2f} {unit}"
    return f"{v:.0f} B"


def _cell(key: str, value) -> str:
    if isinstance(value, float) and key.endswith(("_err", "error")):
        return f"{100 * value:+.3f}%"
    if isinstance(value, float) and key.endswith("_s"):
        return f"{value:.3f}"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            key in PREDICT_KEYS or "bytes" in key):
        return human(value)
    return str(value)


def markdown(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(k, r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def varying(rows: list[dict], keys: tuple[str, ...], axis: str = "num_experts") -> list[str]:
    """Setup keys (other than the plot's x-axis) that take more than one value: they name the
    plot series."""
    return [k for k in keys if k != axis and len({r[k] for r in rows}) > 1]


# the plot's x-axis: N when it varies, else the first of these that does (log2 axes)
AXES = ("num_experts", "ep", "world_size", "dim", "tokens_per_rank", "layers", "heads", "topk")
AXIS_LABELS = {"num_experts": "experts N", "ep": "EP (expert-parallel ranks)",
               "world_size": "ranks", "dim": "d", "tokens_per_rank": "tokens per rank",
               "layers": "PEER layers", "heads": "heads", "topk": "top-k"}


def plot_axis(rows: list[dict]) -> str:
    return next((k for k in AXES if len({r[k] for r in rows}) > 1), "num_experts")


def series_name(row: dict, keys: list[str]) -> str:
    short = {"dim": "d", "layers": "L", "ep": "ep", "world_size": "w", "zero_stage": "z",
             "table_optimizer": "", "strategy": "", "dtype": "", "tokens_per_rank": "t"}
    return " ".join(f"{short.get(k, k)}{'=' if short.get(k, k) else ''}{row[k]}"
                    for k in keys) or "all"


def write_outputs(rows: list[dict], keys: list[str], out: Path, kind: str,
                  plot_series: list[tuple[str, str]],
                  capacity_bytes: float | None = None) -> dict[str, str]:
    """table.md (N, the setup keys that vary, results), table.csv (every key), plot.png and
    TensorBoard scalars under out/tb.

    plot_series: (row key, style) pairs drawn against the axis that varies (N first, else
    EP, ranks, d, ...: plot_axis), one series per other varying setup; capacity_bytes: a
    device's memory, drawn as a line."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(rows, shown_keys(rows, keys)))
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    axis = plot_axis(rows)
    groups = group_rows(rows, axis)
    series = []
    for color, (name, members) in enumerate(groups.items()):
        for key, style in plot_series:
            pts = sorted((r[axis], r[key]) for r in members if r.get(key))
            label = f"{name} {key.replace('_bytes_per_rank', '').replace('_', ' ')}"
            series.append(Series(label, [p[0] for p in pts], [p[1] for p in pts], style, color))
    if capacity_bytes:
        xs = sorted({r[axis] for r in rows})
        series.append(Series(f"device capacity {capacity_bytes / GIB:g} GiB",
                             [xs[0], xs[-1]] if len(xs) > 1 else [xs[0] / 2, xs[0] * 2],
                             [capacity_bytes, capacity_bytes], "line", len(groups)))
    line_chart(out / "plot.png", series, f"peer-scale {kind}: bytes per rank",
               AXIS_LABELS[axis], "bytes per rank")
    write_tensorboard(out / "tb", kind, group_rows(rows), [k for k, _ in plot_series])  # N as step
    return {"table_md": str(out / "table.md"), "table_csv": str(out / "table.csv"),
            "plot": str(out / "plot.png"), "tb": str(out / "tb")}


def shown_keys(rows: list[dict], keys: list[str]) -> list[str]:
    """keys less the setup keys (other than N) that have one value in every row."""
    fixed = set(SETUP_KEYS) - {"num_experts"} - set(varying(rows, SETUP_KEYS))
    return [k for k in keys if k not in fixed]


def group_rows(rows: list[dict], axis: str = "num_experts") -> dict[str, list[dict]]:
    """Rows by the setup keys that vary, less those the axis fixes (world size following EP:
    one line, not one dot per world size)."""
    keys = [k for k in varying(rows, SETUP_KEYS, axis)
            if len({(r[axis], r[k]) for r in rows}) > len({r[axis] for r in rows})]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(series_name(r, keys), []).append(r)
    return groups


def write_tensorboard(path: Path, kind: str, groups: dict[str, list[dict]],
                      keys: list[str]) -> None:
    """One scalar per (series, key), with the number of experts as the step."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path)) as writer:
        for name, members in groups.items():
            tag_base = f"{kind}/{name.replace(' ', '_').replace('=', '')}"
            for r in members:
                for key in keys:
                    if isinstance(r.get(key), (int, float)):
                        writer.add_scalar(f"{tag_base}/{key}", float(r[key]), r["num_experts"])


def emit(rows: list[dict], keys: list[str], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(markdown(rows, keys), end="")


# --------------------------------------------------------------------------- predict

def cmd_predict(args: argparse.Namespace) -> None:
    fill_grid_defaults(args, "predict")
    cal = load_calibration(args)
    points = grid(args)
    for s in points:
        apply_calibration(s, cal)
    rows = [predict_row(s) for s in points]
    keys = list(SETUP_KEYS) + list(PREDICT_KEYS)
    if args.out:
        write_outputs(rows, keys, Path(args.out), "predict",
                      [("total_bytes_per_rank_predicted", "line")],
                      args.gpu_mem_gib * GIB if args.gpu_mem_gib else None)
    emit(rows, keys if args.json else shown_keys(rows, keys), args.json)


# --------------------------------------------------------------------------- plan

RANK_RULE = ("ranked: settings that fit first, then the table optimizer (lazy_adam, "
             "dense_adam, adagrad, sgd), an EP group inside one node (its all-to-all stays on "
             "the node's links), the smaller EP (fewer owners per token), ZeRO 0-2 before 3 "
             "(3 adds parameter all-gathers), the larger micro-batch, the least memory")


def plan_rows(args: argparse.Namespace, world: int | None = None,
              micro: list[int] | None = None) -> list[dict]:
    """Every EP (divisor of the world) x ZeRO stage x micro-batch x table optimizer (those of
    --table-optimizer), each with its predicted whole peak and headroom, best first by
    RANK_RULE. world: GPUs in all (default nodes x GPUs per node); micro: the micro-batches
    (default --micro-batch's)."""
    cfg = base_config(args)
    m = plan_model(args, cfg)
    world = world or args.nodes * args.gpus_per_node
    capacity = args.gpu_mem_gib * GIB
    seq = cfg.train.seq_len
    micro = micro or args.micro_batch or [cfg.train.batch_size]
    cal = load_calibration(args)
    rows = []
    for ep, zero, mb, opt in itertools.product(
            [e for e in range(1, world + 1) if world % e == 0], mm.ZERO_STAGES, micro,
            plan_optimizers(args)):
        s = mm.Setup(m, ep=ep, world_size=world, dtype=args.dtype,
                     table_dtype=args.table_dtype or m.peer.table_dtype,
                     table_optimizer=opt, zero_stage=zero, strategy=args.strategy,
                     table_state_dtype=args.table_state_dtype, tokens_per_rank=mb * seq,
                     runtime_bytes=plan_runtime(args, cal), device="cuda")
        if not rows:  # the first setting: what every other shares with it
            try:
                s.validate()
            except (ValueError, ConfigError) as err:
                raise UserExit(f"peer-scale plan: {err}") from err
        apply_calibration(s, cal)
        if not (cal and cal["device"] == "cuda"):  # a CPU's constants: none below zero
            s.scratch = {k: max(0, v) for k, v in (s.scratch or mm.SELECTION_SCRATCH).items()}
        row = predict_row(s)
        peak = row["peak_bytes_per_rank_predicted"]
        row.update(dp=world // ep, micro_batch=mb, headroom_bytes=int(capacity - peak),
                   headroom_frac=(capacity - peak) / capacity)
        row["fits"] = row["headroom_frac"] >= args.headroom
        rows.append(row)
    rows.sort(key=lambda r: (not r["fits"], OPTIMIZER_RANK[r["table_optimizer"]],
                             r["ep"] > args.gpus_per_node, r["ep"], r["zero_stage"] == 3,
                             -r["micro_batch"], r["peak_bytes_per_rank_predicted"]))
    return rows


def plan_model(args: argparse.Namespace, cfg) -> ModelConfig:
    """The config's model with plan's --num-experts, --dim and --layers."""
    n, d = args.num_experts or cfg.model.peer.num_experts, args.dim or cfg.model.dim
    try:
        return model_for(cfg.model, n, d, args.layers)
    except ConfigError as err:  # e.g. a top-k above sqrt(N), a d the attention heads split
        given = [f"--{k}={v}" for k, v in (("num-experts", args.num_experts), ("dim", args.dim),
                                           ("layers", args.layers)) if v]
        raise UserExit(f"peer-scale plan: {' '.join(given) or 'the config'}: {err}") from err


PLAN_KEYS = ["ep", "dp", "zero_stage", "micro_batch", "table_optimizer", "expert_params",
             "expert_optim", "expert_grads", "dense", "activations", "a2a", "runtime",
             "peak_bytes_per_rank_predicted", "headroom_bytes"]


def plan_optimizers(args: argparse.Namespace) -> list[str]:
    """--table-optimizer's names (checked), else every table optimizer."""
    names = args.table_optimizer or list(mm.TABLE_OPTIMIZERS)
    bad = [n for n in names if n not in mm.TABLE_OPTIMIZERS]
    if bad:
        raise UserExit(f"peer-scale: --table-optimizer={','.join(names)}: {bad} unknown; "
                       f"allowed are {list(mm.TABLE_OPTIMIZERS)}")
    return names


def gpu_counts(per_node: int, most: int) -> list[int]:
    """GPU counts --min-gpus tries, in order: 1 .. one node, then whole nodes."""
    return [g for g in range(1, per_node + 1) if g <= most] + list(
        range(2 * per_node, most + 1, per_node))


def min_gpus(args: argparse.Namespace) -> tuple[int, list[dict], list[tuple[int, dict]]]:
    """(the fewest GPUs that fit, that world's rows best first, (GPUs, least-memory row) for
    every count tried); GPUs is 0 when none up to --max-gpus fits."""
    tried: list[tuple[int, dict]] = []
    # Each world is screened at the smallest micro-batch alone: every part of the peak grows
    # with the tokens per rank, so if no layout fits there none does (tested), and the least
    # memory is there; the world that fits gets every micro-batch. 1/6 of the rows priced.
    least = [min(args.micro_batch)] if args.micro_batch else None
    said = time.monotonic()
    for g in gpu_counts(args.gpus_per_node, args.max_gpus):
        rows = plan_rows(args, world=g, micro=least)
        tried.append((g, min(rows, key=lambda r: r["peak_bytes_per_rank_predicted"])))
        if any(r["fits"] for r in rows):
            return g, plan_rows(args, world=g), tried
        if time.monotonic() - said > 10:  # a long search says where it is
            said = time.monotonic()
            print(f"peer-scale plan --min-gpus: no layout fits on up to {g} GPUs (trying up to "
                  f"--max-gpus={args.max_gpus})", file=sys.stderr, flush=True)
    return 0, [], tried


def cmd_min_gpus(args: argparse.Namespace) -> None:
    g, rows, tried = min_gpus(args)
    if args.out:
        plot_min_gpus(args, tried, Path(args.out))
    if not g:
        best = tried[-1][1]
        raise UserExit(f"peer-scale: nothing fits on up to {args.max_gpus} GPUs of "
                       f"{args.gpu_mem_gib:g} GiB: {tried[-1][0]} GPUs still need "
                       f"{human(best['peak_bytes_per_rank_predicted'])} per rank; allowed: "
                       "a larger --max-gpus or --gpu-mem-gib, or a smaller model")
    fit = [r for r in rows if r["fits"]]
    if args.json:
        emit(fit[:args.top], list(fit[0]), True)
        return
    nodes = -(-g // args.gpus_per_node)
    best = fit[0]
    print(f"fewest GPUs: {g} ({nodes} node{'s' if nodes > 1 else ''} of "
          f"{args.gpus_per_node}, {args.gpu_mem_gib:g} GiB each); best layout there: "
          f"ep={best['ep']} dp={best['dp']} zero={best['zero_stage']} "
          f"micro_batch={best['micro_batch']} {best['table_optimizer']}, peak "
          f"{human(best['peak_bytes_per_rank_predicted'])} per rank")
    print(RANK_RULE)
    print(markdown(fit[:args.top], PLAN_KEYS), end="")


def plot_min_gpus(args: argparse.Namespace, tried: list[tuple[int, dict]], out: Path) -> None:
    xs = [g for g, _ in tried]
    series = [Series("least peak per rank", xs,
                     [r["peak_bytes_per_rank_predicted"] for _, r in tried], "line", 0)]
    _plot_with_capacity(args, out, series, "GPUs", xs)


def _plot_with_capacity(args: argparse.Namespace, out: Path, series: list[Series],
                        xlabel: str, xs: list[int]) -> None:
    """plan.png: the series and the GPU's capacity (less the headroom) as lines."""
    out.mkdir(parents=True, exist_ok=True)
    cap = args.gpu_mem_gib * GIB
    lo, hi = min(xs), max(max(xs), 2)
    series = series + [Series(f"GPU capacity {args.gpu_mem_gib:g} GiB", [lo, hi], [cap, cap],
                              "line", 7),
                       Series(f"capacity less {100 * args.headroom:.0f}% headroom", [lo, hi],
                              [cap * (1 - args.headroom)] * 2, "cross", 7)]
    line_chart(out / "plan.png", series, f"peer-scale plan: predicted peak per rank "
               f"({args.gpus_per_node} GPUs per node)", xlabel, "bytes per rank")
    print(f"peer-scale: wrote {out / 'plan.png'}", file=sys.stderr)


def plot_plan(args: argparse.Namespace, rows: list[dict], out: Path) -> None:
    """Per-rank peak against EP: per ZeRO stage, the least memory over micro-batches and the
    optimizers considered, with the capacity line."""
    series = []
    for color, zero in enumerate(sorted({r["zero_stage"] for r in rows})):
        eps = sorted({r["ep"] for r in rows})
        ys = [min(r["peak_bytes_per_rank_predicted"] for r in rows
                  if r["ep"] == ep and r["zero_stage"] == zero) for ep in eps]
        series.append(Series(f"ZeRO {zero}", eps, ys, "line", color))
    _plot_with_capacity(args, out, series, "EP (expert-parallel ranks)",
                        sorted({r["ep"] for r in rows}))


def check_plan_flags(args: argparse.Namespace) -> None:
    """The combinations of plan's flags that make no sense, each refused in one line before
    any work: --cluster names the nodes, GPUs and memory itself; --min-gpus finds the number
    of GPUs, so takes no --nodes and runs nothing (--check); a cluster within MAX_GPUS; and
    --check's ranks all on this machine."""
    given = [flag for flag, value in (("--nodes", args.nodes),
                                      ("--gpus-per-node", args.gpus_per_node),
                                      ("--gpu-mem-gib", args.gpu_mem_gib),
                                      ("--min-gpus", args.min_gpus or None),
                                      ("--check", args.check or None)) if value is not None]
    if args.cluster is not None and given:
        raise UserExit(f"peer-scale plan: --cluster={args.cluster!r} with {' '.join(given)}: "
                       "allowed is --cluster alone (it names the nodes, GPUs per node and their "
                       "memory), or those flags without --cluster")
    if args.min_gpus and (args.nodes is not None or args.check):
        other = "--nodes" if args.nodes is not None else "--check"
        raise UserExit(f"peer-scale plan: --min-gpus with {other}: allowed is --min-gpus (it "
                       "finds the number of GPUs) without --nodes and --check")
    if args.nodes is not None and args.gpus_per_node is not None and (
            args.nodes * args.gpus_per_node > MAX_GPUS):
        raise UserExit(f"peer-scale plan: --nodes={args.nodes} x --gpus-per-node="
                       f"{args.gpus_per_node} = {args.nodes * args.gpus_per_node} GPUs is "
                       f"invalid: allowed are at most {MAX_GPUS} GPUs in all")
    if args.check and args.nodes is not None and args.gpus_per_node is not None:
        check_ranks_here(args.nodes * args.gpus_per_node,
                         "plan --check runs --nodes x --gpus-per-node ranks here")


def cmd_plan(args: argparse.Namespace) -> None:
    check_plan_flags(args)
    if args.cluster or args.gpus_per_node is None or args.gpu_mem_gib is None:
        cmd_plan_cluster(args)  # --cluster, or the one line naming what is missing
        return
    if args.min_gpus:
        cmd_min_gpus(args)
        return
    if args.nodes is None:
        raise UserExit("peer-scale: plan needs --nodes N (the cluster), or --min-gpus to "
                       "find how many GPUs the model needs")
    rows = plan_rows(args)
    if args.out:
        plot_plan(args, rows, Path(args.out))
        (Path(args.out) / "plan.md").write_text(RANK_RULE + "\n\n" + markdown(
            [r for r in rows if r["fits"]][:args.top], PLAN_KEYS))
    fit = [r for r in rows if r["fits"]]
    if args.check and fit:
        check_plan(args, fit[0])
        return
    if args.json:
        emit(fit[:args.top], list(fit[0]) if fit else [], True)
        return
    r0 = rows[0]
    print(f"cluster: {args.nodes} x {args.gpus_per_node} GPUs, {args.gpu_mem_gib:g} GiB each "
          f"(at least {100 * args.headroom:.0f}% kept free); model: N={r0['num_experts']}, "
          f"d={r0['dim']}, {r0['layers']} PEER layers, {args.dtype}, {args.strategy}, "
          f"runtime {human(r0['runtime'])} per rank")
    print(constants_note(args, fit[0] if fit else r0))
    if not fit:
        smallest = min(rows, key=lambda r: r["peak_bytes_per_rank_predicted"])
        print(f"nothing fits: the smallest setting needs "
              f"{human(smallest['peak_bytes_per_rank_predicted'])} per rank "
              f"(ep={smallest['ep']}, zero={smallest['zero_stage']}, "
              f"micro_batch={smallest['micro_batch']}, {smallest['table_optimizer']})")
        return
    print(f"{len(fit)} of {len(rows)} settings fit; best first ({RANK_RULE}):")
    print(markdown(fit[:args.top], PLAN_KEYS), end="")


CLUSTER_KEYS = ["ep", "dp", "strategy", "micro_batch", "tokens_per_rank", "compute_s",
                "intra_s", "inter_s", "exposed_s", "sync_s", "step_s_predicted",
                "tokens_per_s_per_gpu_predicted", "peak_bytes_per_rank_predicted"]


def cmd_plan_cluster(args: argparse.Namespace) -> None:
    """plan --cluster: the memory model's best fitting setting per EP, joined with the
    step-time model (tools/cluster_model.py) of each strategy, fastest first."""
    from peer_dist.errors import UserError
    from peer_dist.tools import cluster_model as cm

    if not args.cluster:
        raise UserExit("peer-scale: plan needs --gpus-per-node and --gpu-mem-gib (with "
                       f"--nodes or --min-gpus), or --cluster {cm.CLUSTER_FORM}")
    try:
        c = cm.parse_cluster(args.cluster)
    except UserError as e:
        raise UserExit(f"peer-scale plan: {e}") from None
    args.nodes, args.gpus_per_node, args.gpu_mem_gib = c.nodes, c.gpus_per_node, c.mem_bytes / GIB
    cfg = base_config(args)
    peer = cfg.model.peer
    rows = cm.plan_layouts(c, plan_rows(args), cfg.train.seq_len, peer.heads * peer.topk,
                           mm.DTYPE_BYTES[args.dtype])
    if args.json:
        for r in rows[:args.top]:
            print(json.dumps(r))
        return
    print(f"cluster {c.name}: {c.nodes} x {c.gpus_per_node} GPUs, HBM "
          f"{c.hbm_bytes_per_s / 1e12:.2f} TB/s x {c.hbm_fraction:.0%} (assumed until "
          f"measured), NVLink {c.intra_bytes_per_s / 1e9:.0f} GB/s, NIC "
          f"{c.inter_bytes_per_s / 1e9:.0f} GB/s per GPU; times: the PEER layers' part of a "
          "step (the dense part is not modelled); memory: the whole peak (memory model)")
    if not rows:
        print("nothing fits: see peer-scale plan --min-gpus")
        return
    shown = []
    for r in rows[:args.top]:
        cells = {k: (f"{1e3 * r[k]:.2f} ms" if k.endswith("_s") or k == "step_s_predicted"
                     else r[k]) for k in CLUSTER_KEYS}
        cells["tokens_per_s_per_gpu_predicted"] = f"{r['tokens_per_s_per_gpu_predicted']:,.0f}"
        shown.append({**cells, "bound_by": cm.why(r)})
    print(markdown(shown, CLUSTER_KEYS + ["bound_by"]), end="")


def plan_runtime(args: argparse.Namespace, cal: dict | None) -> int:
    """--runtime-bytes, else a GPU calibration's largest runtime (any group: a plan's world
    size and stage need not be one it measured), else 0 (a CPU's RSS runtime is not what the
    CUDA allocator holds)."""
    if args.runtime_bytes is not None:
        return args.runtime_bytes
    if cal and cal["device"] == "cuda" and cal["runtime"]:
        return max(int(v) for v in cal["runtime"].values())
    return 0


def constants_note(args: argparse.Namespace, row: dict) -> str:
    """Where a CUDA plan's measured constants come from, and how much of the shown setting's
    peak (and so of its headroom) rests on numbers taken on a CPU."""
    cal = load_calibration(args)
    where = cal["file"] if cal else "the stored constants"
    if cal and cal["device"] == "cuda":
        return f"constants: calibrated on a GPU ({where}): runtime and selection scratch"
    runtime = ("given" if args.runtime_bytes is not None else "not calibrated on a GPU: 0 B")
    frac = row["scratch_bytes"] / (args.gpu_mem_gib * GIB)
    return (f"constants from a CPU ({where}): selection scratch "
            f"{human(row['scratch_bytes'])} of the best setting's peak ({100 * frac:.1f}% of a "
            f"GPU; the CPU's corrections below zero are not applied), which its headroom "
            f"covers only if the GPU's scratch is no larger; CUDA runtime {runtime}. Calibrate "
            f"on the GPU: GPU_CHECK_ONLY=scale bash launch/gpu_check.sh, then --calibration "
            f"FILE")


def check_plan(args: argparse.Namespace, best: dict) -> None:
    """Run the best setting here for a few steps (world = nodes x GPUs per node ranks) and
    print its predicted whole peak beside the measured one."""
    cfg = base_config(args)
    m = plan_model(args, cfg)
    s = mm.Setup(m, ep=best["ep"], world_size=best["world_size"], dtype=best["dtype"],
                 table_dtype=best["table_dtype"], table_optimizer=best["table_optimizer"],
                 zero_stage=best["zero_stage"], strategy=best["strategy"],
                 table_state_dtype=best["table_state_dtype"],
                 tokens_per_rank=best["tokens_per_rank"], device=local_device())
    check_ranks_here(s.world_size, "plan --check runs --nodes x --gpus-per-node ranks here")
    work = Path(tempfile.mkdtemp(prefix="peer-scale-check-"))
    data = Path(args.data) if args.data else work / "data"
    try:
        row = measure_point(s, args, work, data)
    finally:  # a failed or stopped check leaves no folder behind either
        shutil.rmtree(work, ignore_errors=True)
    print(f"plan --check: ep={s.ep} zero={s.zero_stage} micro_batch={best['micro_batch']} "
          f"{s.table_optimizer}, {cli.plural(s.world_size, 'rank')} here, "
          f"{cli.plural(args.steps, 'step')}")
    print(f"  predicted whole peak {human(row['peak_bytes_per_rank_predicted'])} per rank "
          f"(runtime {human(row['runtime'])}), measured "
          f"{human(row['peak_bytes_per_rank_measured'])} ({row['peak_source']}): "
          f"error {100 * row['peak_rel_err']:+.1f}%")
    if args.json:
        print(json.dumps(row))


# --------------------------------------------------------------------------- measure

def trainer_overrides(s: mm.Setup, args: argparse.Namespace, run_dir: Path, data: Path
                      ) -> list[str]:
    """Dotted overrides that make peer-train run point `s` for a few steps, quietly."""
    m, cfg = s.model, base_config(args)
    seq = cfg.train.seq_len
    return list(args.set) + [
        f"model.dim={m.dim}", f"model.n_layers={m.n_layers}", f"model.peer_blocks={m.peer_blocks}",
        f"model.peer.num_experts={m.peer.num_experts}", f"model.peer.heads={m.peer.heads}",
        f"model.peer.topk={m.peer.topk}", f"parallel.ep={s.ep}",
        f"parallel.strategy={s.strategy}", f"optim.table_optimizer={s.table_optimizer}",
        f"optim.table_state_dtype={s.table_state_dtype}", f"model.peer.table_dtype={s.table_dtype}",
        f"train.zero_stage={s.zero_stage}", f"train.dtype={s.dtype}",
        f"train.steps={args.steps}", "train.log_every=1", f"train.eval_every={args.steps + 1}",
        f"train.run_dir={run_dir}", "train.resume=never", "train.eval_batches=1",
        f"data.path={data}", f"data.max_bytes={args.data_bytes}",
        f"data.source={getattr(cfg.data, 'source', '') or 'stdlib'}",
        f"train.batch_size={max(1, s.tokens_per_rank // seq)}",
    ]


def trainer_argv(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    return (["--config", args.config] if args.config else []) + overrides


def launch(world: int, argv: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """`peer-train ARGV` on `world` ranks in fresh processes (a peak RSS is a process's own
    from its start): through torchrun for several ranks, one rank without a launcher. Its exit
    code and output."""
    launcher = [] if world == 1 else [
        "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    # a session of its own: Ctrl-C at the terminal reaches this process alone, which stops
    # the launch (see main), rather than every rank printing its traceback
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "peer_dist.train", *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return LAUNCH_TIMEOUT, stop_launch(proc)
    except BaseException:  # Ctrl-C or SIGTERM: no rank outlives this process
        stop_launch(proc)
        raise
    return proc.returncode, out


LAUNCH_TIMEOUT = 124  # launch's code for a run stopped at its timeout (as timeout(1) says)
STOP_GRACE_S = 30.0  # torchrun's own wait for its ranks after it forwards a stop


def stop_launch(proc: subprocess.Popen) -> str:
    """Stop a launch and return what it printed: SIGTERM to torchrun's agent, which stops its
    ranks (each in a session of its own: killing the agent alone would orphan them), then
    SIGKILL to whatever is left of its session."""
    proc.terminate()
    try:
        return proc.communicate(timeout=STOP_GRACE_S + 5)[0]
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            return proc.communicate(timeout=5)[0]
        except subprocess.TimeoutExpired:  # a rank that outlived its agent holds the pipe
            proc.kill()
            return ""


# On CPU the measured peak is the ranks' peak RSS, and glibc's heap keeps freed buffers below
# its mmap threshold, which it raises itself as large buffers are freed (up to 32 MiB): the
# peak then grows step over step with how each step's buffers happen to fit (750 -> 868 MB
# over three identical steps at N = 65,536, EP 1 on 2 ranks), and the same run's peak moves
# by 140 MiB with the threshold alone (693 MiB at 1 MiB, 725 at 4, 798 at 16, 813-837 as it
# moves). The model counts live bytes, as CUDA's allocator peak does, so the measured ranks
# take buffers of 1 MiB and more straight from the OS and give them back when freed: RSS
# follows live bytes. Steps run slower for it (a fresh mapping per buffer). A value set in
# the environment is kept (and named in the runtime's key).
CPU_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}


def malloc_policy() -> str:
    """The measured ranks' heap policy on CPU, as it goes into the runtime's key."""
    return f"mmap {os.environ.get('MALLOC_MMAP_THRESHOLD_', CPU_MALLOC['MALLOC_MMAP_THRESHOLD_'])}"


def run_point(s: mm.Setup, args: argparse.Namespace, work: Path, data: Path) -> dict:
    """One launch of peer-train (through torchrun for several ranks); returns what it
    measured (see read_run)."""
    name = (f"n{s.n}_d{s.d}_L{s.layers}_ep{s.ep}_w{s.world_size}_z{s.zero_stage}_"
            f"t{s.tokens_per_rank}_{s.strategy}_{s.table_optimizer}")
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**(CPU_MALLOC if s.device == "cpu" else {}), **os.environ,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    argv = trainer_argv(args, trainer_overrides(s, args, run_dir, data))
    code, output = launch(s.world_size, argv, env, args.timeout)
    if code == LAUNCH_TIMEOUT:
        log = work / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
        raise SystemExit(f"peer-scale: the run {name} did not finish within --timeout "
                         f"{args.timeout:g} s and was stopped (its output: {log}); allowed: a "
                         "larger --timeout")
    if code != 0:
        tail = output[-3000:]
        raise SystemExit(f"peer-scale measure: the run {name} failed (exit {code}):"
                         f"\n{tail}")
    out = read_run(run_dir)
    out["wall_s"] = time.perf_counter() - t0
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def read_run(run_dir: Path) -> dict:
    """What peer-train measured: summary.json (per-rank expert bytes = local shard tensors plus
    their optimizer state) and metrics.jsonl (step seconds, all-to-all bytes sent per layer and
    step, and per rank the peak RSS, or on CUDA the allocator's peak, at the last training
    step: the evaluation and checkpoint after it are not part of a training step's peak). The
    largest rank decides memory."""
    mib = 2 ** 20
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    steps = [r["step_seconds"] for r in train if "step_seconds" in r][1:]  # skip warm-up step
    sent = [sum(v for k, v in r.items() if k.startswith("comm/") and k.endswith("/bytes_sent"))
            for r in train if any(k.startswith("comm/") for k in r)]
    rows = [max(v for k, v in r.items() if k.endswith("/grad_rows")) for r in train
            if any(k.endswith("/grad_rows") for k in r)]
    last = next((r for r in reversed(train) if any(k.startswith("memory/") for k in r)), {})
    cuda = [v for k, v in last.items() if k.endswith("/cuda_peak_allocated_mib")]
    rss_train = [v for k, v in last.items() if k.endswith("/peak_rss_mib")]
    rss_run = max(summary["peak_rss_mib_per_rank"]) * mib
    peak = max(cuda) if cuda else max(rss_train) if rss_train else rss_run / mib
    return {"expert_bytes_per_rank_measured": round(max(summary["expert_mib_per_rank"]) * mib),
            "peak_bytes_per_rank_measured": round(peak * mib),
            "peak_source": "cuda_max_allocated" if cuda else "peak_rss",
            "run_peak_rss_bytes_per_rank": round(rss_run),
            "step_s": statistics.median(steps) if steps else None,
            "bytes_moved_per_step": statistics.median(sent) if sent else None,
            # rows of rank 0's shard gradient per step, the largest layer's (what routing
            # touched; the uniform model's count is grad_rows_predicted)
            "grad_rows_measured": max(rows) if rows else None}


def _cache_file(name: str = "runtime_bytes.json") -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "peer_dist" / name


def runtime_key(s: mm.Setup, args: argparse.Namespace) -> str:
    import deepspeed
    import torch

    device = "cuda" if torch.cuda.is_available() else f"cpu|{malloc_policy()}"
    return (f"{device}|torch {torch.__version__}|deepspeed {deepspeed.__version__}|"
            f"config {config_digest(args)}|world {s.world_size}|zero {s.zero_stage}|{s.dtype}")


def config_digest(args: argparse.Namespace) -> str:
    config = Path(args.config).read_text() if args.config else ""
    return hashlib.sha256((config + "\n".join(args.set)).encode()).hexdigest()[:12]


def point_key(s: mm.Setup, args: argparse.Namespace) -> str:
    """What identifies a measured point: its setup on its base config."""
    r = setup_row(s)
    return f"config {config_digest(args)}|" + "|".join(f"{k}={r[k]}" for k in SETUP_KEYS)


def load_calibration(args: argparse.Namespace, flag: str = "--calibration") -> dict | None:
    """--calibration FILE, else this machine's last `peer-scale calibrate` (cached), else None
    (the stored SELECTION_SCRATCH and a runtime from a minimal run)."""
    path = getattr(args, "calibration", None)
    path = Path(path) if path else _cache_file("calibration.json")
    if not path.is_file():
        if getattr(args, "calibration", None):
            what = "a folder" if path.is_dir() else "no such file"
            raise UserExit(f"peer-scale: {flag} {path}: {what} (allowed: a "
                           "calibration.json written by peer-scale calibrate)")
        return None
    try:
        cal = json.loads(path.read_text())
        cal["selection_scratch"], cal["runtime"], cal["points"]  # noqa: B018 (the keys we read)
        law = (cal.get("routing") or {}).get("law")
        if law is not None and not (isinstance(law, list) and len(law) in (2, 4) and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in law)):
            raise ValueError(f"routing law {law!r} is not 4 finite numbers [K, beta, gamma, "
                             "delta]")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        why = (f"no key {err}" if isinstance(err, KeyError) else
               "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else
               str(err).splitlines()[0][:120] if str(err) else type(err).__name__)
        if not getattr(args, "calibration", None):  # this machine's cached copy: not the user's
            print(f"peer-scale: this machine's cached calibration {str(path)!r} is damaged "
                  f"({why}): ignored (peer-scale calibrate writes it again)", file=sys.stderr)
            return None
        raise UserExit(f"peer-scale: {flag} {path}: not a calibration file ({why}); "
                       "allowed: a calibration.json written by peer-scale calibrate") from err
    cal["file"] = str(path)
    return cal


def apply_calibration(s: mm.Setup, cal: dict | None, routing: bool = False) -> None:
    """The calibration's scratch constants, and with routing=True its routing law (measure's
    prediction of this machine's runs; predict and plan keep uniform routing, the upper
    estimate, since a law fitted on short runs of this data need not hold for a trained
    model on other data)."""
    if cal:
        s.scratch = {**mm.SELECTION_SCRATCH, **cal["selection_scratch"]}
        law = (cal.get("routing") or {}).get("law")
        if routing and law and len(law) == 4:  # an older two-number law is not used
            s.routing = tuple(law)


def runtime_bytes(s: mm.Setup, args: argparse.Namespace, work: Path, data: Path,
                  cal: dict | None = None) -> tuple[int, str]:
    """The runtime's own bytes per rank for s's world size, ZeRO stage and dtype, and where the
    value came from: given (--runtime-bytes), the calibration's, or (for a group the
    calibration lacks) a minimal training run (the smallest table the config allows, one
    sequence per rank) measured less what the model predicts for it, cached per machine."""
    if args.runtime_bytes is not None:
        return args.runtime_bytes, "given"
    key = runtime_key(s, args)
    if cal and key in cal["runtime"]:
        return int(cal["runtime"][key]), "calibration"
    cache = _cache_file()
    known = _read_cache(cache)
    if key in known:
        return int(known[key]), "minimal run"
    tiny = tiny_setup(s, args)
    apply_calibration(tiny, cal)
    print(f"peer-scale: measuring the runtime's own memory ({key})", file=sys.stderr)
    measured = run_point(tiny, args, work / "runtime", data)["peak_bytes_per_rank_measured"]
    value = max(0, measured - mm.breakdown(tiny)["total"])
    known[key] = value
    _write_json(cache, known)
    return value, "minimal run"


def _read_cache(path: Path) -> dict:
    """The runtime cache's {key: bytes}; a damaged one (a crash elsewhere, an edit) is said in
    a line and measured again, then rewritten: a cache is never a reason to stop."""
    if not path.is_file():
        return {}
    try:
        known = json.loads(path.read_text())
        if isinstance(known, dict) and all(isinstance(v, int) for v in known.values()):
            return known
    except (OSError, ValueError):
        pass
    print(f"peer-scale: the cache {str(path)!r} is damaged: ignored, and rewritten with what "
          "is measured now", file=sys.stderr)
    return {}


def tiny_setup(s: mm.Setup, args: argparse.Namespace) -> mm.Setup:
    """s on the smallest table the config allows, one sequence per rank, EP 1."""
    m = copy.deepcopy(s.model)
    n_sub = max(m.peer.topk, 16)
    m.peer.num_experts = n_sub * n_sub
    return mm.Setup(m, ep=1, world_size=s.world_size, dtype=s.dtype, zero_stage=s.zero_stage,
                    table_optimizer=s.table_optimizer, strategy=s.strategy,
                    tokens_per_rank=base_config(args).train.seq_len, device=s.device)


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


def measure_point(s: mm.Setup, args: argparse.Namespace, work: Path, data: Path,
                  cal: dict | None = None, split: str = "validation") -> dict:
    """One point: the prediction (constants from the calibration), the run, their errors, on
    the whole peak and on the modelled terms alone (peak less the runtime)."""
    apply_calibration(s, cal, routing=True)
    s.runtime_bytes, source = runtime_bytes(s, args, work, data, cal)
    row = predict_row(s)
    row["peak_bytes_uniform_routing_predicted"] = mm.breakdown(
        replace(s, routing=None))["total"]  # what plan assumes
    row.update(run_point(s, args, work / "runs", data))
    row.update(split=split, runtime_source=source,
               calibration=cal["file"] if cal else "stored constants")
    given_routing(s, row)
    return add_errors(row)


def given_routing(s: mm.Setup, row: dict) -> None:
    """The model again with the run's own routing (its measured gradient rows summed up as
    the routing law's K, memory_model.routing_for) in place of the predicted routing: what
    the memory accounting gets right once routing is known, apart from how routing is
    predicted. Leaves s as it was; nothing without a measured row count."""
    row["grad_rows_predicted"] = mm.touched_rows(s)
    if not row.get("grad_rows_measured"):
        return
    own = replace(s, routing=mm.routing_for(s, row["grad_rows_measured"]))
    row["routing_k_given"] = own.routing[0] if own.routing else None
    row["peak_bytes_given_routing_predicted"] = mm.breakdown(own)["total"]


def add_errors(row: dict) -> dict:
    """Relative errors of the expert bytes, the whole peak and the modelled terms alone (both
    sides less the runtime term)."""
    meas = row["expert_bytes_per_rank_measured"]
    row["expert_rel_err"] = (row["expert_bytes_per_rank_predicted"] - meas) / meas
    peak = row["peak_bytes_per_rank_measured"]
    row["peak_rel_err"] = row["peak_bytes_per_rank_predicted"] / peak - 1.0
    row["modelled_bytes_predicted"] = row["peak_bytes_per_rank_predicted"] - row["runtime"]
    row["modelled_bytes_measured"] = peak - row["runtime"]
    row["modelled_rel_err"] = (row["modelled_bytes_predicted"]
                               / max(1, row["modelled_bytes_measured"]) - 1.0)
    if "peak_bytes_uniform_routing_predicted" in row:
        row["peak_rel_err_uniform_routing"] = row["peak_bytes_uniform_routing_predicted"] / peak - 1
    if "peak_bytes_given_routing_predicted" in row:
        given = row["peak_bytes_given_routing_predicted"]
        row["peak_rel_err_given_routing"] = given / peak - 1.0
        row["modelled_rel_err_given_routing"] = ((given - row["runtime"])
                                                 / max(1, row["modelled_bytes_measured"]) - 1.0)
    return row


MEASURE_KEYS = ("split", "expert_bytes_per_rank_predicted", "expert_bytes_per_rank_measured",
                "expert_rel_err", "runtime", "peak_bytes_per_rank_predicted",
                "peak_bytes_per_rank_measured", "peak_rel_err", "modelled_bytes_predicted",
                "modelled_bytes_measured", "modelled_rel_err", "grad_rows_predicted",
                "grad_rows_measured", "peak_rel_err_uniform_routing", "peak_rel_err_given_routing",
                "modelled_rel_err_given_routing", "step_s",
                "a2a_bytes_moved_predicted", "bytes_moved_per_step")


def check_ranks_here(world: int, what: str = "a point's world size: --world-size, else its "
                     "--ep") -> None:
    """Every rank of a measured point runs on this machine."""
    from peer_dist.train.startup import local_ranks_error

    problem = local_ranks_error(world, "world size")
    if problem:
        raise UserExit(f"peer-scale: {problem} ({what})")


def measure_points(args: argparse.Namespace) -> tuple[list[mm.Setup], str]:
    """The grid flags' points, else the named grid (--grid, default validation)."""
    flags = any(getattr(args, k) is not None for k in GRID_FLAGS)
    if flags and getattr(args, "grid", None):
        raise UserExit(f"peer-scale: --grid {args.grid} takes no grid flags (allowed: "
                       "--grid alone, or grid flags without --grid)")
    if flags:
        fill_grid_defaults(args, "measure")
        return grid(args), "flags"
    name = getattr(args, "grid", None) or ("calibration" if args.command == "calibrate"
                                          else "validation")
    return named_grid(name, args), name


def run_grid(args: argparse.Namespace, points: list[mm.Setup], out: Path, cal: dict | None,
             label: str) -> list[dict]:
    """Measure every point, printing progress; a point is in the calibration split when the
    calibration was fitted on it."""
    check_ranks_here(max((s.world_size for s in points), default=1))  # before any run
    data = Path(args.data) if args.data else out / "data"
    fitted = set(cal["points"]) if cal else set()
    rows, t0 = [], time.perf_counter()
    for i, s in enumerate(points, 1):
        split = ("calibration" if label == "calibrate" or point_key(s, args) in fitted
                 else "validation")
        row = measure_point(s, args, out, data, cal, split)
        rows.append(row)
        if args.json and label == "measure":
            print(json.dumps(row), flush=True)
        got = f"measured {human(row['peak_bytes_per_rank_measured'])}"
        if label == "measure":  # calibrate has no prediction before its fit
            got = (f"predicted {human(row['peak_bytes_per_rank_predicted'])}, {got} "
                   f"({100 * row['peak_rel_err']:+.1f}%; modelled terms "
                   f"{100 * row['modelled_rel_err']:+.1f}%)")
        print(f"peer-scale {label}: point {i}/{len(points)} ({row['split']}): {got}, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def accuracy(rows: list[dict]) -> str:
    """Worst and mean |error| of the whole peak and of the modelled terms, per split."""
    lines = []
    for split in ("validation", "calibration"):
        rs = [r for r in rows if r["split"] == split]
        if not rs:
            continue
        parts = []
        for key, name, target in (
                ("peak_rel_err", "whole peak", 0.05), ("modelled_rel_err", "modelled terms", 0.1),
                ("peak_rel_err_uniform_routing", "uniform routing (plan's): whole peak", 0.05),
                ("peak_rel_err_given_routing", "given the run's routing: whole peak", 0.05),
                ("modelled_rel_err_given_routing", "modelled terms", 0.1)):
            if any(r.get(key) is None for r in rs):
                continue
            worst = max(rs, key=lambda r, k=key: abs(r[k]))
            mean = statistics.mean(abs(r[key]) for r in rs)
            beyond = sum(abs(r[key]) > target for r in rs)
            parts.append(f"{name}: worst {100 * worst[key]:+.1f}% (N={worst['num_experts']}, "
                         f"d={worst['dim']}, ep={worst['ep']}, tokens={worst['tokens_per_rank']}"
                         f", zero={worst['zero_stage']}), mean |error| {100 * mean:.1f}%, "
                         f"{beyond} beyond {100 * target:.0f}%")
        lines.append(f"{split} split, {len(rs)} points: " + "; ".join(parts))
    return "\n".join(lines)


def write_measure(rows: list[dict], out: Path) -> None:
    keys = list(SETUP_KEYS) + list(MEASURE_KEYS)
    write_outputs(rows, keys, out, "measure",
                  [("peak_bytes_per_rank_predicted", "line"),
                   ("peak_bytes_per_rank_measured", "points"),
                   ("expert_bytes_per_rank_measured", "cross")])
    predicted_vs_measured(out / "predicted_vs_measured.png",
                          [r["peak_bytes_per_rank_predicted"] for r in rows],
                          [r["peak_bytes_per_rank_measured"] for r in rows],
                          [f"ep={r['ep']} zero={r['zero_stage']}" for r in rows],
                          "peer-scale measure: whole peak per rank")


def cmd_measure(args: argparse.Namespace) -> None:
    points, name = measure_points(args)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="peer-scale-"))
    cal = load_calibration(args)
    t0 = time.perf_counter()
    try:
        rows = run_grid(args, points, out, cal, "measure")
    except BaseException:
        if not args.out:  # a temporary folder that holds nothing of use yet
            shutil.rmtree(out, ignore_errors=True)
        raise
    write_measure(rows, out)
    if not args.json:
        print(markdown(rows, shown_keys(rows, list(SETUP_KEYS) + list(MEASURE_KEYS))), end="")
    print(f"peer-scale measure ({name} grid, constants: "
          f"{cal['file'] if cal else 'stored'}): {time.perf_counter() - t0:.0f} s\n"
          f"{accuracy(rows)}", file=sys.stderr)


# --------------------------------------------------------------------------- calibrate

def cmd_calibrate(args: argparse.Namespace) -> None:
    """Measure the calibration grid, fit the runtime per group and the scratch per kind
    together (memory_model.fit_calibration), write OUT/calibration.json with every point and
    its residual, and make it this machine's calibration (the cache that measure reads)."""
    if getattr(args, "calibration", None):  # read by predict, measure and plan; never here
        raise UserExit(f"peer-scale calibrate: --calibration={args.calibration!r} is invalid "
                       "here: calibrate writes a calibration (allowed: --refit FILE to fit an "
                       "earlier one's measurements again)")
    points, name = measure_points(args)
    out = Path(args.out or "runs/scale/calibration")
    t0 = time.perf_counter()
    if args.runtime_bytes is None:
        args.runtime_bytes = 0  # the fit finds it: no minimal runs of their own
    rows = (stored_rows(args, points) if args.refit
            else run_grid(args, points, out, None, "calibrate"))
    groups = [runtime_key(s, args) for s in points]
    try:
        law = mm.fit_routing(points, [r.get("grad_rows_measured") for r in rows])
    except ValueError as err:  # a grid without the counts to fit it: uniform routing
        law = None
        print(f"peer-scale calibrate: no routing law ({err}); measure predicts uniform "
              "routing", file=sys.stderr)
    for s, r in zip(points, rows, strict=True):  # the scratch: given each run's own routing
        s.routing = law
        if r.get("grad_rows_measured"):
            s.routing = mm.routing_for(s, r["grad_rows_measured"])
    fit = mm.fit_calibration(points, [r["peak_bytes_per_rank_measured"] for r in rows], groups)
    for s, r, g, res in zip(points, rows, groups, fit.residuals, strict=True):
        s.scratch, s.runtime_bytes = {**mm.SELECTION_SCRATCH, **fit.scratch}, fit.runtime[g]
        s.routing = law  # the row's prediction: the fitted routing, as measure's
        r.update(predict_row(s), split="calibration", runtime_source="calibration",
                 fit_rel_err=res)
        given_routing(s, r)  # fit_rel_err is this one's error
        add_errors(r)
    cal = calibration_record(args, points, rows, fit, law, name, time.perf_counter() - t0)
    _write_json(out / "calibration.json", cal)
    _write_json(_cache_file("calibration.json"), cal)
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
    print(markdown(rows, ["num_experts", "dim", "ep", "world_size", "zero_stage", "strategy",
                          "tokens_per_rank", "heads", "topk", "peak_bytes_per_rank_measured",
                          "fit_rel_err"]), end="")
    routing = (f"the T tokens of each of W ranks make min(T W, {law[0]:.3g} T^{law[1]:.3f} "
               f"W^{law[2]:.3f} N^{law[3]:.3f}) distinct queries" if law else "uniform")
    print(f"peer-scale calibrate: routing: {routing}; selection scratch per selection and "
          f"layer {fit.scratch} B; runtime per group:", file=sys.stderr)
    for key, value in fit.runtime.items():
        print(f"  {key}: {human(value)}", file=sys.stderr)
    print(f"peer-scale calibrate: {len(rows)} points in {time.perf_counter() - t0:.0f} s, worst "
          f"fit error {100 * max(map(abs, fit.residuals)):.2f}%; wrote "
          f"{out / 'calibration.json'} (also this machine's default)", file=sys.stderr)


def stored_rows(args: argparse.Namespace, points: list[mm.Setup]) -> list[dict]:
    """--refit FILE: the measurements of an earlier calibration of the same grid (fitted again,
    e.g. after the fit changed), in the grid's order."""
    cal = load_calibration(argparse.Namespace(calibration=args.refit), "--refit")
    keys = [point_key(s, args) for s in points]
    if cal["points"] != keys:
        raise UserExit(f"peer-scale: --refit {args.refit} measured other points than this "
                       "grid (allowed: the file of a calibration with the same grid flags, "
                       "config and versions)")
    args.measured_by = cal["provenance"].get("measured_by", cal["provenance"]["command"])
    args.measured_s = cal["provenance"]["seconds"]
    return cal["rows"]


def calibration_record(args: argparse.Namespace, points: list[mm.Setup], rows: list[dict],
                       fit: mm.Fit, law: tuple[float, float] | None, name: str,
                       seconds: float) -> dict:
    import deepspeed
    import torch

    return {
        "device": points[0].device,
        "selection_scratch": fit.scratch,
        "runtime": fit.runtime,
        "routing": {"law": list(law) if law else None,
                    "fit": "distinct queries D = min(T W, K T^beta W^gamma N^delta) of T "
                           "tokens on each of W ranks, N rows: least squares of log D over "
                           "the points whose counted gradient rows (comm/<layer>/grad_rows) "
                           "are below their shard's size, D from the count "
                           "(memory_model.fit_routing); law = [K, beta, gamma, delta]"},
        "points": [point_key(s, args) for s in points],
        "provenance": {
            "command": " ".join(["peer-scale", *args.argv]),
            "measured_by": getattr(args, "measured_by", None) or " ".join(["peer-scale",
                                                                          *args.argv]),
            "grid": name, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "cpu_heap": f"glibc {malloc_policy()} (scale.CPU_MALLOC: RSS follows live bytes)",
            "steps": args.steps, "seconds": getattr(args, "measured_s", round(seconds)),
            "fit": "given each point's routing (its measured gradient rows as the routing "
                   "law's K): measured peak - other terms = runtime[group] + tokens * "
                   "(scratch[token] + selections * scratch[kind]); scratch: least squares "
                   "of each point's difference from its group's smallest point; runtime: "
                   "that point exact",
            "worst_fit_rel_err": max(map(abs, fit.residuals)),
        },
        "rows": rows,
    }


# --------------------------------------------------------------------------- entry point

# path flags: what each must name (a folder made when missing, or a file that must exist)
PATH_FLAGS = {"out": "a folder, new or existing", "data": "a folder, new or existing",
              "config": "a YAML config file", "calibration": "a calibration.json file",
              "refit": "a calibration.json file", "cluster": "NODESxGPUS:KIND or a YAML file"}


def check_paths(args: argparse.Namespace) -> None:
    """Path flags refused before any work: an empty one, and a folder (--out, --data) where a
    file, or a folder that cannot be written, stands in its place."""
    for key, allowed in PATH_FLAGS.items():
        value = getattr(args, key, None)
        if value is None:
            continue
        flag = f"--{key}={value!r}"
        if not value.strip():
            raise UserExit(f"peer-scale {args.command}: {flag} is invalid: allowed is {allowed}")
        if not allowed.startswith("a folder"):
            continue
        problem = folder_error(value)  # a probe: the folder is made when it is written
        if problem:
            raise UserExit(f"peer-scale {args.command}: {flag} is invalid: {problem}; allowed "
                           f"is {allowed}")


# the config keys each command sets itself (a --set of one would be replaced without a word):
# key -> where its value comes from
GRID_OWN = {"model.dim": "--dim", "model.peer.num_experts": "--num-experts",
            "parallel.ep": "--ep", "parallel.strategy": "--strategy",
            "optim.table_optimizer": "--table-optimizer",
            "optim.table_state_dtype": "--table-state-dtype", "train.zero_stage": "--zero-stage",
            "train.dtype": "--dtype"}
# keys that follow the config unless their grid flag is given
FLAG_OWN = {"model.peer.heads": "heads", "model.peer.topk": "topk", "model.peer_blocks": "layers",
            "model.peer.table_dtype": "table_dtype", "train.batch_size": "tokens_per_rank"}
PLAN_OWN = {"parallel.ep": "it ranks every EP", "train.zero_stage": "it ranks every ZeRO stage",
            "parallel.strategy": "--strategy", "train.dtype": "--dtype",
            "optim.table_optimizer": "--table-optimizer",
            "optim.table_state_dtype": "--table-state-dtype", "train.batch_size": "--micro-batch"}
RUN_OWN = {"train.steps": "--steps", "data.path": "--data", "data.max_bytes": "--data-bytes",
           "train.run_dir": "a run folder of its own per point", "train.resume": "never",
           "train.log_every": "every step", "train.eval_every": "once, after the last step",
           "train.eval_batches": "one batch"}


def own_keys(args: argparse.Namespace) -> dict[str, str]:
    """The config keys this command sets itself, each with where its value comes from."""
    if args.command == "plan":
        own = dict(PLAN_OWN)
        if args.layers is not None:
            own["model.peer_blocks"] = "--layers"
        return {**own, **(RUN_OWN if args.check else {})}
    if any(getattr(args, k) is not None for k in GRID_FLAGS) or args.command == "predict":
        own = dict(GRID_OWN)
        if args.command != "predict":  # measure's default tokens: 128, 1024, 4096
            own["train.batch_size"] = "--tokens-per-rank"
        own.update({key: "--" + flag.replace("_", "-") for key, flag in FLAG_OWN.items()
                    if getattr(args, flag) is not None})
    else:  # a named grid: each point sets its shape and layout
        grid = getattr(args, "grid", None) or ("calibration" if args.command == "calibrate"
                                              else "validation")
        own = {key: f"each point of the {grid} grid has its own"
               for key in [*GRID_OWN, *FLAG_OWN]
               if key != "model.peer_blocks"}
    return {**own, **RUN_OWN}


def check_set(args: argparse.Namespace) -> None:
    """A --set of a key the command sets itself is refused, naming where its value comes from
    (a flag to give instead, or what the command decides)."""
    own = own_keys(args)
    hit = cli.own_override(args.set, own)
    if hit:
        item, key = hit
        source = own[key]
        hint = f"give {source} instead" if source.startswith("--") else source
        raise UserExit(f"peer-scale {args.command}: --set {item!r} is invalid: {args.command} "
                       f"sets {key} itself ({hint}); allowed are the other keys")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # calibrate records the command that made its constants
    from peer_dist.tools.export import quiet_env

    quiet_env()  # DeepSpeed's guess of the accelerator printed a warning on stdout (--json)
    commands = {"predict": cmd_predict, "plan": cmd_plan, "measure": cmd_measure,
                "calibrate": cmd_calibrate}
    old = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM as Ctrl-C: runs stopped too
    try:
        check_paths(args)
        check_set(args)
        commands[args.command](args)
    except UserExit as e:  # one line, status 2 (e.code)
        print(e, file=sys.stderr, flush=True)
        raise
    except KeyboardInterrupt as e:  # one line, and the status of the signal: 130 or 143
        sig = signal.Signals.__members__.get(e.args[0] if e.args else "", signal.SIGINT)
        print(f"peer-scale {args.command}: stopped by {sig.name} (its runs stopped; what was "
              "measured before is printed above)", file=sys.stderr, flush=True)
        raise SystemExit(128 + sig.value) from None
    finally:
        signal.signal(signal.SIGTERM, old)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    main()
