#!/usr/bin/env bash
# One command that checks a GPU machine and writes one markdown report with every figure:
#   1. what is here (GPU, driver, torch, triton, deepspeed), installing what is missing
#   2. the kernel tests on CUDA (Triton mix against Algorithm 1 and autograd, the Triton row
#      optimizers against the PyTorch path, takes() refusals, product-key selection against
#      brute force), and peer-bench kernels: the static compile table (registers, spills,
#      load width, bytes in flight) beside the measured figures of part 3
#   3. peer-bench layer --device cuda: ours in fp32 and bf16 against PEER-pytorch and against
#      the copy-bandwidth roofline at the paper's shape (N = 1024^2, d = 1024, h = 8, k = 16)
#   4. configs/peer_1m.yaml on one GPU in bf16 at ZeRO 1, 2 and 3 (a few steps each)
#   5. peer-bench dist on this GPU (one rank: the strategies' device paths and the step model
#      with constants measured here), and the mix kernels' achieved fraction of HBM bandwidth
#      it gives, the step-time model's assumption until then (cluster_model --from-bench:
#      the 1/8/64/512-GPU table with the measured fraction)
#   6. peer-scale calibrate on the CUDA allocator (the memory model's runtime and scratch
#      constants, written to $OUT/calibration/calibration.json for plan --calibration), then
#      peer-scale measure with them (predicted against measured peak per rank)
#
#   bash launch/gpu_check.sh                  # report: runs/gpu_check/report.md
#   GPU_CHECK_OUT=/tmp/gc bash launch/gpu_check.sh
#   GPU_CHECK_QUICK=1 bash launch/gpu_check.sh  # smaller shapes, a couple of minutes
#   GPU_CHECK_ONLY=kernels,bench bash launch/gpu_check.sh   # some parts: kernels, bench,
#                                                           # dist, train, scale (default: all)
#   GPU_CHECK_WHEELS=.whl bash launch/gpu_check.sh  # no package index there: install what is
#                                                   # missing from wheels (launch/gpu_wheels.sh)
#
# A failing step is recorded in the report (with its log's tail) and the next one runs; the
# exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
QUICK=${GPU_CHECK_QUICK:-0}
ONLY=${GPU_CHECK_ONLY:-kernels,bench,dist,train,scale}
for part in ${ONLY//,/ }; do
    case $part in kernels|bench|dist|train|scale) ;;
        *) echo "gpu_check: GPU_CHECK_ONLY part '$part' is invalid: allowed are kernels," \
                "bench, dist, train, scale (comma-separated)" >&2; exit 2 ;;
    esac
done
wants() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
WHEELS=${GPU_CHECK_WHEELS:-}
if [ -n "$WHEELS" ] && ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_check: GPU_CHECK_WHEELS='$WHEELS' holds no wheels: allowed is a folder of" \
         "wheels (bash launch/gpu_wheels.sh DIR makes one), or unset to install from the index" >&2
    exit 2
fi
mkdir -p "$OUT"
REPORT="$OUT/report.md"
FAILED=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch here (or no torch); allowed: a machine" \
         "with a GPU and a CUDA build of torch" >&2
    exit 2
fi

if [ "$QUICK" = 1 ]; then
    N=262144; DIM=512; TOKENS=4096,8192; STEPS=4; SCALE_N=16384,65536
else
    N=1048576; DIM=1024; TOKENS=4096,8192,16384,32768; STEPS=10; SCALE_N=65536,262144,1048576
fi

# step NAME TIMEOUT_S CMD...: runs CMD, keeps its output in $OUT/NAME.log, notes the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "gpu_check: $name ..." >&2
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        echo "gpu_check: $name ok (${took} s)" >&2
        printf '\n_%s: ok in %s s_\n' "$name" "$took" >>"$REPORT"
    else
        FAILED=$((FAILED + 1))
        echo "gpu_check: $name FAILED (exit $rc after ${took} s; log $OUT/$name.log)" >&2
        { printf '\n**%s FAILED** (exit %s after %s s; `%s`). Last lines:\n\n```\n' \
              "$name" "$rc" "$took" "$*"
          tail -n 25 "$OUT/$name.log"; printf '```\n'; } >>"$REPORT"
    fi
    return $rc
}

# 1. the machine, and what is installed: what is missing comes from GPU_CHECK_WHEELS (a folder
#    of wheels for a machine with no package index; launch/gpu_wheels.sh makes one) or the index
missing() {
    for m in peer_dist deepspeed triton pytest hypothesis PEER_pytorch; do
        "$PY" -c "import $m" >/dev/null 2>&1 || printf '%s ' "$m"
    done
}
if [ -n "$(missing)" ]; then
    if [ -n "$WHEELS" ]; then
        { "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e .
          "$PY" -m pip install --no-index --find-links "$WHEELS" "PEER-pytorch==0.2.2"; } \
            >"$OUT/install.log" 2>&1  # each on its own: the benchmark's baseline is optional
    else
        "$PY" -m pip install --quiet -e ".[test,gpu,bench]" >"$OUT/install.log" 2>&1
    fi
fi
STILL=$(missing)
{
    echo "# peer_dist GPU check"
    echo
    echo "Written by \`bash launch/gpu_check.sh\` on $(date -u +%Y-%m-%d) (quick=$QUICK)."
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1
    "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -n 1
    "$PY" -c "import PEER_pytorch; print('PEER-pytorch installed')" 2>&1 | tail -n 1
    echo '```'
    if [ -n "$STILL" ]; then
        echo
        echo "**Not installed: ${STILL% }** (see $OUT/install.log); the parts that need them fail."
    fi
} >"$REPORT"

# 2. kernel tests on CUDA (TRITON_INTERPRET unset: the compiled kernels)
if wants kernels; then
echo -e "\n## Kernel tests on CUDA" >>"$REPORT"
if step kernel_tests 900 env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider \
        tests/unit/test_triton_kernels.py tests/unit/test_triton_optim.py \
        tests/unit/test_triton_takes.py tests/unit/test_triton_compile.py \
        tests/unit/test_topk.py; then
    { echo '```'; tail -n 3 "$OUT/kernel_tests.log"; echo '```'; } >>"$REPORT"
fi
echo -e "\n## Kernels compiled for sm_80 and sm_90 (static, not a speed)" >>"$REPORT"
COMPILE=("$PY" -m peer_dist.tools.bench kernels --dims "$DIM" --jobs 8)
echo -e "\n\`${COMPILE[*]}\`\n" >>"$REPORT"
if step kernel_compile 900 "${COMPILE[@]}"; then
    grep -E "^(\||In flight)" "$OUT/kernel_compile.log" >>"$REPORT"
fi
fi

# 3. the layer against PEER-pytorch and the roofline
if wants bench; then
echo -e "\n## Layer benchmark (forward + backward)" >>"$REPORT"
IMPLS=peer_dist,peer-pytorch
"$PY" -c "import PEER_pytorch" 2>/dev/null || IMPLS=peer_dist
BENCH=("$PY" -m peer_dist.tools.bench layer --device cuda --dtype fp32,bf16 --num-experts "$N" --dim "$DIM"
       --heads 8 --topk 16 --d-key 128 --tokens "$TOKENS" --modes fwd_bwd --impls "$IMPLS"
       --repeats 5 --warmup 2)
echo -e "\n\`${BENCH[*]}\`" >>"$REPORT"
if step layer_bench 1500 "${BENCH[@]}"; then
    { echo '```'; cat "$OUT/layer_bench.log"; echo '```'; } >>"$REPORT"
fi
fi

# 4. the expert layer's step on this GPU, and the kernels' achieved HBM fraction
if wants dist; then
echo -e "\n## Expert-layer step on one GPU (peer-bench dist), and the step-time model" >>"$REPORT"
DIST=("$PY" -m peer_dist.tools.bench dist --nprocs-list 1 --num-experts "$N" --dim "$DIM"
      --tokens 4096 --steps "$STEPS" --no-paper --json)
echo -e "\n\`${DIST[*]}\`" >>"$REPORT"
if step dist_bench 900 "${DIST[@]}"; then
    { echo '```'; grep '^{' "$OUT/dist_bench.log"; echo '```'; } >>"$REPORT"
    case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
        *H200*) KIND=h200 ;; *A100*) KIND=a100 ;; *) KIND=h100 ;;
    esac
    MODEL=("$PY" -m peer_dist.tools.cluster_model --gpus 1,8,64,512 --cluster "$KIND"
           --from-bench "$OUT/dist_bench.log")
    echo -e "\n\`${MODEL[*]}\`" >>"$REPORT"
    if step cluster_model 300 "${MODEL[@]}"; then
        { echo '```'; cat "$OUT/cluster_model.log"; echo '```'; } >>"$REPORT"
    fi
fi
fi

# 5. peer_1m on one GPU, bf16, ZeRO 1-3
if wants train; then
echo -e "\n## configs/peer_1m.yaml, one GPU, bf16" >>"$REPORT"
for z in 1 2 3; do
    TRAIN=("$PY" -m peer_dist.train --config configs/peer_1m.yaml --nproc 1 train.dtype=bf16
           train.zero_stage=$z train.steps=$STEPS train.log_every=1 train.eval_every=1000000
           train.ckpt_every=1000000 train.resume=never train.run_dir="$OUT/train_z$z")
    echo -e "\n\`${TRAIN[*]}\`" >>"$REPORT"
    if step "train_zero$z" 900 "${TRAIN[@]}"; then
        { echo '```'; grep -E "final loss|throughput|experts|peak|step +$STEPS" \
              "$OUT/train_zero$z.log" | tail -n 8; echo '```'; } >>"$REPORT"
    fi
done
fi

# 6. predicted against measured memory on the CUDA allocator
if wants scale; then
echo -e "\n## Memory model constants, calibrated on this GPU" >>"$REPORT"
# one GPU: world size 1; tokens and selections per token vary so that the runtime, the scratch
# per token and per selection are told apart (memory_model.fit_calibration)
CALIB=("$PY" -m peer_dist.tools.scale calibrate --config configs/peer_1m.yaml --num-experts 4096
       --dim 256 --ep 1 --dtype bf16 --tokens-per-rank 1024,4096 --topk 8,16 --steps 3
       --out "$OUT/calibration")
echo -e "\n\`${CALIB[*]}\`" >>"$REPORT"
CAL_ARGS=()
if step scale_calibrate 900 "${CALIB[@]}"; then
    { echo '```'; tail -n 12 "$OUT/scale_calibrate.log"; echo '```'; } >>"$REPORT"
    CAL_ARGS=(--calibration "$OUT/calibration/calibration.json")
fi
echo -e "\n## Per-rank memory, predicted and measured (CUDA allocator)" >>"$REPORT"
SCALE=("$PY" -m peer_dist.tools.scale measure --config configs/peer_1m.yaml --num-experts "$SCALE_N" --dim 256
       --ep 1 --dtype bf16 --tokens-per-rank 4096 --steps 3 --out "$OUT/scale" ${CAL_ARGS[@]+"${CAL_ARGS[@]}"})
echo -e "\n\`${SCALE[*]}\`" >>"$REPORT"
if step scale_measure 900 "${SCALE[@]}"; then
    { cat "$OUT/scale/table.md" 2>/dev/null || tail -n 20 "$OUT/scale_measure.log"; } \
        >>"$REPORT"
fi
fi

echo -e "\n$FAILED step(s) failed." >>"$REPORT"
echo "gpu_check: report $REPORT ($FAILED failed)" >&2
exit "$FAILED"
