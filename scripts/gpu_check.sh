#!/usr/bin/env bash
# One command for a GPU machine (issue #9): the CUDA tests (every kernel against the CPU
# path on the GPU itself), then the GPU benchmark tables. Logs go to $OUT (default
# runs/gpu_check). Usage: bash scripts/gpu_check.sh [--quick | --ct | --mri]
#   --quick  a smaller cone case; --ct  the CT projectors only (CUDA tests of tests/operators,
#   bench_gpu.py), no training or MRI benchmark; --mri  the MRI operators only (their CUDA
#   tests and tests/models, the SENSE benchmark, a per-kernel profile (scripts/gpu/profile_mri.py;
#   MRI_BASELINE=path/to/old/mri.py times an older operator beside it) and the training step).
#   BASELINE=path/to/old/_triton_ct.py times an
#   older version of the kernels side by side (bench_gpu.py --baseline).
#
# Optional ASTRA-CUDA comparison: put astra-toolbox's wheel in .whl/ (it is unpacked into
# /tmp/astra-site). Its libastra needs libcudart.so.12 and libcufft.so.11: where the machine
# has a newer CUDA, put libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel) in
# .gpu/lib; libcufft.so.11 is replaced by a stand-in built here from scripts/gpu/cufft_stub.c
# (ASTRA calls cuFFT only in its FBP/FDK filters, which the benchmark does not use).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export FEDRECON_CACHE_DIR=off PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv

if ! $PY -c "import fedrecon.operators" 2>/dev/null; then
    # not installed: a shim package whose subpackages point into this checkout
    shim=/tmp/fedrecon-shim/fedrecon
    rm -rf /tmp/fedrecon-shim && mkdir -p "$shim"
    for f in "$PWD"/fedrecon/*; do ln -s "$f" "$shim/"; done
    ln -s "$PWD/operators" "$shim/operators"
    ln -s "$PWD/datasets" "$shim/datasets"
    export PYTHONPATH=/tmp/fedrecon-shim${PYTHONPATH:+:$PYTHONPATH}
fi
if ls .whl/astra_toolbox-*.whl >/dev/null 2>&1; then
    rm -rf /tmp/astra-site && mkdir -p /tmp/astra-site
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/astra-site .whl/astra_toolbox-*.whl
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/astra-site
    mkdir -p /tmp/astra-lib
    [ -d .gpu/lib ] && cp .gpu/lib/* /tmp/astra-lib/
    if ! ldconfig -p | grep -q libcufft.so.11 && [ ! -e /tmp/astra-lib/libcufft.so.11 ]; then
        gcc -shared -fPIC -O2 -o /tmp/astra-lib/libcufft.so.11 scripts/gpu/cufft_stub.c \
            -Wl,--version-script=scripts/gpu/cufft.map -Wl,-soname,libcufft.so.11
    fi
    export LD_LIBRARY_PATH=/tmp/astra-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

status=0
mode=${1:-}
tests="tests/operators tests/models"
[ "$mode" = "--ct" ] && tests="tests/operators"
[ "$mode" = "--mri" ] && tests="tests/operators/test_mri.py tests/operators/test_mri_split.py tests/operators/test_contract.py tests/models"
echo "## CUDA tests"
# the tests check every launch shape explicitly; tuning each test's shapes would only compile
FEDRECON_TRITON_TUNE=0 $PY -P -m pytest -q -m cuda -p no:cacheprovider $tests 2>&1 | tee "$OUT/cuda_tests.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ "$mode" = "--mri" ]; then
    echo "## MRI operators on the GPU"
    $PY scripts/bench_operators.py --device cuda --only mri --repeats 20 2>&1 | tee "$OUT/bench_operators_cuda.md" | tail -22
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    $PY scripts/gpu/profile_mri.py ${MRI_BASELINE:-} 2>&1 | tee "$OUT/profile_mri.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    echo "## training step"
    $PY scripts/bench_training.py --device cuda --amp --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_training.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    exit $status
fi
echo "## projectors"
base=()
[ -n "${BASELINE:-}" ] && base=(--baseline "$BASELINE")
if [ "$mode" = "--ct" ]; then
    $PY scripts/bench_gpu.py "${base[@]}" 2>&1 | tee "$OUT/bench_gpu.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    exit $status
elif [ "$mode" = "--quick" ]; then
    $PY scripts/bench_gpu.py --cone-size 96 --cone-views 120 --cone-det-rows 96 --cone-det-cols 128 2>&1 | tee "$OUT/bench_gpu.md"
else
    $PY scripts/bench_gpu.py "${base[@]}" 2>&1 | tee "$OUT/bench_gpu.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    echo "## cone beam at a size no sparse matrix fits"
    $PY scripts/bench_gpu.py --no-2d --cone-size 256 --cone-views 360 --cone-det-rows 256 \
        --cone-det-cols 384 2>&1 | tee "$OUT/bench_gpu_cone256.md"
fi
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "## training step"
$PY scripts/bench_training.py --device cuda --amp --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_training.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "## MRI operators on the GPU"
$PY scripts/bench_operators.py --device cuda --only mri 2>&1 | tee "$OUT/bench_operators_cuda.md" | tail -15
exit $status
