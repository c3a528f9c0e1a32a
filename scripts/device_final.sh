#!/usr/bin/env bash
# One device call at the end of a stop: kernel self-tests and micro-benchmarks to $OUT, then
# scripts/device_bench.sh (capsules). With EXP_BIN set (another build's zmlx and its kernel
# cache in EXP_CACHE), first a pattern bisect of patched-run determinism with that binary.
set -uo pipefail
Z=./target/release/zmlx
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -n "${EXP_BIN:-}" ]; then
  for ex in none qkv_proj o_proj_add gather_qmm_swiglu gather_qmm_combine; do
    if [ $ex = none ]; then sel=(); else sel=(--exclude $ex); fi
    ZMLX_CACHE_DIR=$EXP_CACHE $EXP_BIN validate --model configs/qwen3-30b-a3b --dummy-weights --device cuda \
      --max-tokens 64 --runs 3 "${sel[@]}" 2>&1 | grep -E "^fidelity" | sed "s/^/experiment, preset minus $ex: /"
  done
fi
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
$Z kernels test --backend cuda > "$OUT/kernels_test.txt" 2>&1; echo "kernels test rc=$? $(tail -1 "$OUT/kernels_test.txt")"
$Z kernels bench --backend cuda > "$OUT/kernels_bench.txt" 2>&1; echo "kernels bench rc=$?"
OUT=$OUT bash scripts/device_bench.sh
