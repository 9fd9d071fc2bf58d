#!/usr/bin/env bash
# Install peer_dist and its test dependencies into the current Python environment.
# A torch that is already installed (a CUDA build on a GPU cluster, say) is kept; without one,
# torch 2.13.0 is installed first, so that no resolver picks a torch version of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --progress-bar on "torch==2.13.0"
# The project's own build needs setuptools >= 64 (pyproject.toml): where the environment has it,
# the editable install uses it instead of pip's fresh build environment (~6 s of the install)
isolation=()
"$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" \
  2>/dev/null && isolation=(--no-build-isolation)
"$PY" -m pip install --progress-bar on "${isolation[@]}" -e ".[test,gpu]"  # gpu: triton (tested on CPU too)
