#!/usr/bin/env bash
# Reduced GPU check (the CUDA operator tests and the 2D/MRI tables) for short device leases.
set -uo pipefail
cd "$(dirname "$0")/../.."
export FEDRECON_CACHE_DIR=off PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"
shim=/tmp/fedrecon-shim/fedrecon; rm -rf /tmp/fedrecon-shim; mkdir -p "$shim"
for f in "$PWD"/fedrecon/*; do ln -s "$f" "$shim/"; done
ln -s "$PWD/operators" "$shim/operators"; ln -s "$PWD/datasets" "$shim/datasets"
export PYTHONPATH=/tmp/fedrecon-shim
python3 -P -m pytest -q -m cuda -p no:cacheprovider tests/operators 2>&1 | tee "$OUT/cuda_tests.log" | tail -4
python3 scripts/bench_gpu.py --no-astra --no-cone 2>&1 | grep -v Warn | tee "$OUT/bench_gpu.md" | grep "^|\|ceil"
python3 scripts/bench_operators.py --device cuda --only mri 2>&1 | tee "$OUT/mri.md" | grep "^|"
