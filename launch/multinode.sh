#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR / MASTER_PORT / NNODES.
# c10d rendezvous at MASTER_ADDR:MASTER_PORT (node ranks are assigned by the rendezvous;
# NODE_RANK is only passed on for logs). NPROC = ranks per node (default: GPUs, or 2 on CPU).
#   MASTER_ADDR=node0 MASTER_PORT=29400 NNODES=2 bash launch/multinode.sh --config configs/peer_1m.yaml
# The run directory (train.run_dir) must be on a filesystem every node sees: checkpoints are
# written by all ranks into one folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
: "${MASTER_ADDR:?set MASTER_ADDR to the host of the rendezvous (node 0)}"
: "${NNODES:?set NNODES to the number of nodes}"
MASTER_PORT=${MASTER_PORT:-29400}
NODE_RANK=${NODE_RANK:-0}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Restarts: without this, restarted workers can read the failed attempt's Gloo/NCCL addresses
# from the TCPStore torchrun shares across attempts and fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
echo "multinode: node ${NODE_RANK} of ${NNODES}, ${NPROC} ranks/node, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
# peer-train runs torchrun's launcher itself (c10d rendezvous), so a failed rank ends in one line.
exec "$PY" -m peer_dist.train --nnodes "$NNODES" --nproc "$NPROC" \
  --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${RDZV_ID:-peer_dist}" \
  --max-restarts "${MAX_RESTARTS:-0}" "$@"
