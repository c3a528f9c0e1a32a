#!/usr/bin/env bash
# moe_experts (one persistent launch for the experts) on the GPU: its self-tests, the kernel
# bench rows for each block geometry in $GEOMS (ZMLX_MOE_EXPERTS=threads,rows), and patched
# decode with and without it (dummy Qwen3-30B-A3B), alternated. Logs under $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=configs/qwen3-30b-a3b
if [ "${SKIP_KERNEL_TESTS:-0}" != 1 ]; then
  $Z kernels test --backend cuda > "$OUT/kernels_test.txt" 2>&1; echo "kernels test rc=$?"
  grep -E "moe_experts|FAIL" "$OUT/kernels_test.txt" | head -20; tail -1 "$OUT/kernels_test.txt"
fi
for g in ${GEOMS:-512,2}; do
  ZMLX_MOE_EXPERTS=$g $Z kernels bench --backend cuda > "$OUT/bench_$g.txt" 2>&1
  echo "== geometry $g rc=$?"; grep -E "swiglu\+combine|moe_experts|MoE block|^gather_qmm" "$OUT/bench_$g.txt"
done
for round in $(seq 1 "${ROUNDS:-2}"); do
  for ex in "" "--exclude moe_experts"; do
    for n in ${TOKENS:-128}; do
      r=$(ZMLX_MOE_EXPERTS=${DECODE_GEOM:-512,2} $Z validate --model $M --dummy-weights --device cuda --max-tokens $n --runs ${RUNS:-3} $ex 2>&1 | grep -E '^fidelity|tok/s|launches|^Patched|skip' | tr '\n' ' ')
      echo "[${ex:-with moe_experts}] tokens=$n round $round: $r"
    done
  done
done
