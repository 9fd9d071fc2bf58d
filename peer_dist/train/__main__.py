"""peer-train: `peer-train --config configs/tiny.yaml [key=value ...]`.

One process per rank. Under torchrun (RANK in the environment) it trains as that rank; without
torchrun it trains as a world of one, or with `--nproc N` (N > 1) it starts
`torchrun --standalone --nproc_per_node=N -m peer_dist.train ...` itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from peer_dist.config import ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="peer-train", description="Train a PEER language model (expert tables sharded "
        "across ranks, dense part with DeepSpeed ZeRO).",
        epilog="Example: peer-train --config configs/tiny.yaml train.steps=20 train.zero_stage=2")
    p.add_argument("--config", default=None, help="YAML config file (defaults if omitted)")
    p.add_argument("--nproc", type=int, default=1,
                   help="without torchrun: start this many local ranks through torchrun")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dim=64")
    return p.parse_args(argv)


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun with nproc local ranks."""
    rest = [a for i, a in enumerate(argv) if not a.startswith("--nproc")
            and not (i > 0 and argv[i - 1] == "--nproc")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "peer_dist.train", *rest]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"peer-train: {e}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "RANK" not in os.environ:
        return relaunch(args.nproc, argv)
    import torch.distributed as dist

    from peer_dist.train.loop import run

    try:
        run(cfg)
        # No rank may tear down its communicators while another still uses them (with several
        # torchrun agents the ranks would otherwise exit at different times).
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
