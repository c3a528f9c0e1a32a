#!/usr/bin/env bash
# One device call: kernel self-tests, kernel benchmarks and patched decode with each launch-bounds
# variant of the expert kernels (ZMLX_SWIGLU_MIN_BLOCKS / ZMLX_COMBINE_MIN_BLOCKS). Logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Z=./target/release/zmlx; export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache; M=configs/qwen3-30b-a3b
$Z kernels test --backend cuda > $OUT/kernels_test.txt 2>&1; echo "kernels test rc=$?"; grep -E "FAIL" $OUT/kernels_test.txt | head -5; tail -1 $OUT/kernels_test.txt
$Z kernels bench --backend cuda > $OUT/kernels_bench.txt 2>&1; grep -E "^gather_qmm|MoE block" $OUT/kernels_bench.txt
for cfg in "0 0" "12 4" "8 3" "12 0" "0 4" "8 4"; do set -- $cfg
  ZMLX_SWIGLU_MIN_BLOCKS=$1 ZMLX_COMBINE_MIN_BLOCKS=$2 $Z bench --model $M --dummy-weights --device cuda --gen-lens 128,512 --runs 3 --graph on --out-dir $OUT --name sw$1-c$2 2>&1 | grep -E "^\s+on" | tr '\n' ' ' | sed "s/^/swiglu_min=$1 combine_min=$2: /"; echo
done
