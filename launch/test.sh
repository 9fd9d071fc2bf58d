#!/usr/bin/env bash
# The whole test suite on a fresh clone: installs what it needs, lints, then runs the unit,
# distributed (gloo ranks) and integration (torchrun, the real CLI) tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash launch/setup.sh
"$PY" -m ruff check peer_dist tests
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -q tests "$@"
