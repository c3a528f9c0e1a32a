#!/usr/bin/env bash
# One device call for the tensor-core matvec path (ops::uses_tc4): kernel self-tests, CUDA vs
# CPU on every fixture, then kernel micro-benchmarks and patched vs unpatched decode on dummy
# Qwen3-30B-A3B with the path on (ZMLX_TC=1) and off (ZMLX_TC=0). Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SKIP_KERNEL_TESTS=${SKIP_KERNEL_TESTS:-0} OUT=$OUT bash scripts/device_check.sh
grep -E "FAIL" "$OUT/kernels_test.txt" | head -20
for tc in ${TC_LIST:-1 0}; do
  if [ "${SKIP_KERNEL_BENCH:-0}" != 1 ]; then
    ZMLX_TC=$tc $Z kernels bench --backend cuda > "$OUT/kernels_bench_tc$tc.txt" 2>&1
    echo "== kernels bench ZMLX_TC=$tc rc=$?"; grep -E "qmv|gather|swiglu|combine|copy" "$OUT/kernels_bench_tc$tc.txt" | head -30
  fi
done
for round in 1 2; do
  for tc in ${TC_LIST:-1 0}; do
    f="$OUT/validate_tc${tc}_$round.txt"
    ZMLX_TC=$tc $Z validate --model configs/qwen3-30b-a3b --dummy-weights --device cuda --max-tokens ${TOKENS:-128} --runs ${RUNS:-3} > "$f" 2>&1
    echo "ZMLX_TC=$tc round $round rc=$? $(grep -E '^fidelity|tok/s|speedup|launches' "$f" | tr '\n' ' ')"
  done
done
