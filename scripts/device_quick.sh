#!/usr/bin/env bash
# One short device call for an A/B after a kernel or runtime change: kernel self-tests,
# kernel micro-benchmarks, and patched vs unpatched on dummy Qwen3-30B-A3B with programmatic
# dependent launch off and on (ZMLX_PDL). Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=configs/qwen3-30b-a3b
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_KERNEL_TESTS:-0}" != 1 ]; then
  $Z kernels test --backend cuda > "$OUT/kernels_test.txt" 2>&1; echo "kernels test rc=$?"; grep -E "FAIL" "$OUT/kernels_test.txt" | head; tail -2 "$OUT/kernels_test.txt"
fi
if [ "${SKIP_KERNEL_BENCH:-0}" != 1 ]; then
  $Z kernels bench --backend cuda > "$OUT/kernels_bench.txt" 2>&1; echo "kernels bench rc=$?"
  grep -E "attn|attention|lm_head|qmv .*N=151936|combine|swiglu" "$OUT/kernels_bench.txt" | head -40
fi
for pdl in ${PDL_LIST:-0 1}; do
  for n in ${TOKENS:-128}; do
    ZMLX_PDL=$pdl $Z validate --model $M --dummy-weights --device cuda --max-tokens $n --runs ${RUNS:-3} --json > "$OUT/validate_pdl${pdl}_$n.txt" 2>&1
    echo "PDL=$pdl tokens=$n rc=$? $(grep -v '^{' "$OUT/validate_pdl${pdl}_$n.txt" | grep -E '^fidelity|^Patched|speedup|tok/s|launches' | tr '\n' ' ')"
  done
done
