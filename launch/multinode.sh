#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR / MASTER_PORT / NNODES.
# c10d rendezvous at MASTER_ADDR:MASTER_PORT (node ranks are assigned by the rendezvous;
# NODE_RANK is only shown). NPROC = ranks per node (default: GPUs, or 2 on CPU).
#   MASTER_ADDR=node0 MASTER_PORT=29400 NNODES=2 bash launch/multinode.sh --config configs/peer_1m.yaml
# The run directory (train.run_dir) must be on a filesystem every node sees: checkpoints are
# written by all ranks into one folder. peer-launch --dry-run shows the command.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the host of the rendezvous (node 0)}"
: "${NNODES:?set NNODES to the number of nodes}"
exec "${PYTHON:-python3}" -m peer_dist.tools.cluster "$@"
