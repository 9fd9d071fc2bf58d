#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index, made on one that can: what the
# project needs beyond a CUDA image that already holds torch, triton, numpy, pyyaml,
# tensorboard, matplotlib, pytest and hypothesis. That is DeepSpeed (built here into a wheel
# when only its source archive is published) and what it needs, and PEER-pytorch for the layer
# benchmark's side-by-side. The compiled ones are fetched for the target machine's Python.
#
#   bash launch/gpu_wheels.sh DIR [PYTHON_VERSION]     # e.g. .whl 3.12 (default: this Python's)
#   # on the GPU machine, DIR beside the checkout:
#   GPU_CHECK_WHEELS=DIR bash launch/gpu_check.sh       # installs from DIR, no index
#
# DeepSpeed's version is the one installed here (what the tests ran), else the newest.
set -euo pipefail
PY=${PYTHON:-python3}
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "gpu_wheels: usage: bash launch/gpu_wheels.sh DIR [PYTHON_VERSION], e.g." \
         "bash launch/gpu_wheels.sh .whl 3.12" >&2
    exit 2
fi
DIR=$1
PYV=${2:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
if ! [[ $PYV =~ ^3\.[0-9]+$ ]]; then
    echo "gpu_wheels: PYTHON_VERSION '$PYV' is invalid: allowed is major.minor, e.g. 3.12" >&2
    exit 2
fi
mkdir -p "$DIR"
LOG="$DIR/gpu_wheels.log"
: >"$LOG"
# pip's own messages go to the log; a failure is one line naming what could not be had
pip_or_fail() {
    local what=$1
    shift
    if ! "$PY" -m pip "$@" >>"$LOG" 2>&1; then
        echo "gpu_wheels: pip could not get $what (a package index reachable from here, and" \
             "for Python $PYV, is needed; pip's messages: $LOG)" >&2
        exit 1
    fi
}
DS=$("$PY" -c 'import importlib.metadata as m; print("deepspeed==" + m.version("deepspeed"))' \
     2>/dev/null || echo "deepspeed>=0.16")
echo "gpu_wheels: $DS and its pure-Python needs, PEER-pytorch 0.2.2 (any Python) ..." >&2
pip_or_fail "$DS, hjson, py-cpuinfo, tqdm, einops, PEER-pytorch 0.2.2, einx" \
    wheel --no-deps -w "$DIR" "$DS" hjson py-cpuinfo tqdm einops PEER-pytorch==0.2.2 einx
echo "gpu_wheels: pydantic (and pydantic-core, compiled) and frozendict for Python $PYV ..." >&2
pip_or_fail "pydantic (with pydantic-core) and frozendict" \
    download --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR" "pydantic>=2" frozendict
echo "gpu_wheels: $(find "$DIR" -name '*.whl' | wc -l) wheels in $DIR" \
     "($(du -sh "$DIR" | cut -f1))" >&2
