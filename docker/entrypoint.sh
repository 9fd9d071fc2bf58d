#!/usr/bin/env bash
# Container entry point: one torchrun agent per container.
#   single node:  NPROC (default: visible GPUs, or 2 on CPU) ranks, --standalone
#   several nodes: set MASTER_ADDR, NNODES (and MASTER_PORT, NODE_RANK) -> launch/multinode.sh
#   any other command: `docker run peer_dist bash` runs it instead
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  ""|--*|*=*) ;;                    # training arguments: fall through
  *) exec "$@" ;;                   # a command such as bash or peer-bench
esac
if [ -n "${MASTER_ADDR:-}" ] && [ "${NNODES:-1}" -gt 1 ]; then
  exec bash launch/multinode.sh "$@"
fi
exec bash launch/run.sh "$@"
