"""peer-bench: `peer-bench layer ...` (one device, against PEER-pytorch),
`peer-bench dist ...` (sharded strategies under torchrun, against replicated tables) or
`peer-bench router ...` (the router's precision under bf16) or `peer-bench kernels ...` (the
Triton kernels compiled for sm_80 and sm_90: registers, spills, loads, bytes in flight) or
`peer-bench checkpoint ...` (training's pause per checkpoint, foreground against background)."""

from __future__ import annotations

import sys

USAGE = ("usage: peer-bench {layer,dist,router,kernels,checkpoint} [options]   (peer-bench "
         "layer --help for options)")
COMMANDS = ("layer", "dist", "router", "kernels", "checkpoint")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
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


if __name__ == "__main__":
    main()
