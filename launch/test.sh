#!/usr/bin/env bash
# The whole test suite: unit, distributed (gloo ranks) and integration (torchrun) tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m ruff check peer_dist tests
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -q tests "$@"
