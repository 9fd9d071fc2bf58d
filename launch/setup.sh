#!/usr/bin/env bash
# Install peer_dist and its test dependencies into the current Python environment.
# A CUDA torch that is already installed is kept; without torch, the CPU build is installed
# first so that the dependency resolver does not pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0" \
    || "$PY" -m pip install --quiet torch --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
"$PY" -m pip install --quiet -e ".[test]"
