"""peer-bench: `peer-bench layer ...` (one device, against PEER-pytorch),
`peer-bench dist ...` (sharded strategies under torchrun, against replicated tables) or
`peer-bench router ...` (the router's precision under bf16) or `peer-bench kernels ...` (the
Triton kernels compiled for sm_80 and sm_90: registers, spills, loads, bytes in flight) or
`peer-bench checkpoint ...` (training's pause per checkpoint, foreground against background).

Each command checks its flags before any work starts: a bad value is one line on stderr naming
it and what is allowed, exit status 2."""

from __future__ import annotations

import os
import re
import sys

USAGE = ("usage: peer-bench {layer,dist,router,kernels,checkpoint} [options]   (peer-bench "
         "COMMAND --help for its options)")
COMMANDS = ("layer", "dist", "router", "kernels", "checkpoint")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        return
    if not argv:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if argv[0] not in COMMANDS:
        print(f"peer-bench: command {argv[0]!r} is invalid: allowed are {', '.join(COMMANDS)} "
              "(see peer-bench --help)", file=sys.stderr)
        raise SystemExit(2)
    if argv[0] == "layer":
        from peer_dist.tools.bench_layer import main as run
    elif argv[0] == "dist":
        from peer_dist.tools.bench_dist import main as run
    elif argv[0] == "kernels":
        from peer_dist.tools.bench_kernels import main as run
    elif argv[0] == "checkpoint":
        from peer_dist.tools.bench_checkpoint import main as run
    else:
        from peer_dist.tools.bench_router import main as run
    run(argv[1:])


# ---------------------------------------------------------------- checks the commands share

def add_shape_args(p, num_experts: int, dim: int, d_key: str | None = None) -> None:
    """The layer-shape flags of layer, dist and router (their relations: shape_error);
    d_key: the help of --d-key, None for a command without it."""
    from peer_dist import cli

    p.add_argument("--num-experts", type=cli.COUNT, default=num_experts,
                   help="N (a perfect square)")
    p.add_argument("--dim", type=cli.COUNT, default=dim)
    p.add_argument("--heads", type=cli.COUNT, default=8)
    p.add_argument("--topk", type=cli.COUNT, default=16, help="experts per head, <= sqrt(N)")
    if d_key is not None:
        p.add_argument("--d-key", type=cli.COUNT, default=128, help=d_key)


def shape_error(num_experts: int, heads: int, topk: int, d_key: int = 128) -> str | None:
    """The one-line error for a PEER layer shape the config would refuse (N a perfect square,
    1 <= topk <= sqrt(N), d_key even), naming the command's flags; None when it is valid."""
    from peer_dist.config import ConfigError, PEERConfig

    try:
        PEERConfig(num_experts=num_experts, heads=heads, topk=topk, d_key=d_key).validate("@")
    except ConfigError as e:
        return re.sub(r"@\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
    return None


def machine_bytes(device: str = "cpu") -> int:
    """The memory of this machine (device "cuda": of its first GPU); 0 when unknown."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_error(flags: str, what: str, need: int, device: str = "cpu",
                 have: int | None = None) -> str | None:
    """The one-line error for values that need more memory than this machine has at all
    (`what` takes `need` bytes); None when they fit, or the machine's memory is unknown."""
    have = machine_bytes(device) if have is None else have
    if not have or need <= have:
        return None
    return (f"{flags} is invalid here: {what} take about {need / 2**30:,.1f} GiB, more than "
            f"this machine's {have / 2**30:,.1f} GiB ({device}): allowed are values that fit")


if __name__ == "__main__":
    main()
