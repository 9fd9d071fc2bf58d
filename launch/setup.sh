#!/usr/bin/env bash
# Install peer_dist and its test dependencies into the current Python environment.
# A torch that is already installed (a CUDA build on a GPU cluster, say) is kept; without one,
# torch 2.13.0 is installed first, so that no resolver picks a torch version of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --progress-bar on "torch==2.13.0"
# gpu: triton (tested on CPU too). Where the environment's setuptools builds editable wheels on
# its own (>= 70.1), the install uses it instead of a fresh build environment (~6 s); if that
# fails, the usual isolated build.
if "$PY" -c "import setuptools as s, sys; sys.exit(tuple(map(int, s.__version__.split('.')[:2])) < (70, 1))" \
  2>/dev/null; then
  "$PY" -m pip install --progress-bar on --no-build-isolation -e ".[test,gpu]" \
    || "$PY" -m pip install --progress-bar on -e ".[test,gpu]"
else
  "$PY" -m pip install --progress-bar on -e ".[test,gpu]"
fi
