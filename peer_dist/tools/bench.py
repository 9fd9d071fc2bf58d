"""peer-bench: `peer-bench layer ...` (one device, against PEER-pytorch),
`peer-bench dist ...` (sharded strategies under torchrun, against replicated tables) or
`peer-bench router ...` (the router's precision under bf16)."""

from __future__ import annotations

import sys

USAGE = "usage: peer-bench {layer,dist,router} [options]   (peer-bench layer --help for options)"
COMMANDS = ("layer", "dist", "router")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if argv[0] == "layer":
        from peer_dist.tools.bench_layer import main as run
    elif argv[0] == "dist":
        from peer_dist.tools.bench_dist import main as run
    else:
        from peer_dist.tools.bench_router import main as run
    run(argv[1:])


if __name__ == "__main__":
    main()
