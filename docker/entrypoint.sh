#!/usr/bin/env bash
# Container entry point: one torchrun agent per container (node), laid out by peer-launch from
# the cluster's environment (SLURM_*, Kubeflow PyTorchJob, MASTER_ADDR + NNODES, or one node).
#   training arguments (--config ..., key=value, --dry-run)  ->  peer-launch
#   any other command (`docker run peer_dist bash`)          ->  run as is
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  ""|--*|*=*) ;;                    # training arguments: fall through
  *) exec "$@" ;;                   # a command such as bash or peer-bench
esac
exec "${PYTHON:-python3}" -m peer_dist.tools.cluster "$@"
