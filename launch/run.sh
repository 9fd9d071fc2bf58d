#!/usr/bin/env bash
# One node: the main job. Installs the package first if needed, then
#   peer-train --nproc $NPROC [--config FILE] [key=value ...]
# (torchrun's launcher, run by peer-train so that a failed rank ends in one line).
# NPROC defaults to the number of GPUs, or 2 ranks on CPU. Without --config: configs/small.yaml.
#   bash launch/run.sh                                   # the default job
#   bash launch/run.sh --config configs/tiny.yaml train.steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import peer_dist, deepspeed, torch.utils.tensorboard" >/dev/null 2>&1 || bash launch/setup.sh
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
ARGS=("$@")
case " $* " in *" --config "*|*" --config="*) ;; *) ARGS=(--config configs/small.yaml "$@") ;; esac
# Threads: peer-train gives each rank cores / NPROC unless OMP_NUM_THREADS or train.threads says.
exec "$PY" -m peer_dist.train --nproc "$NPROC" "${ARGS[@]}"
