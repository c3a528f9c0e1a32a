#!/usr/bin/env bash
# A/B of one pattern on dummy Qwen3-30B-A3B (CUDA): kernel self-tests, then `zmlx validate`
# with the preset and with the preset minus $AB_PATTERN, alternated $AB_ROUNDS times (medians
# of each validate are over --runs). Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=configs/qwen3-30b-a3b
P=${AB_PATTERN:?set AB_PATTERN}
if [ "${SKIP_KERNEL_TESTS:-0}" != 1 ]; then
  $Z kernels test --backend cuda > "$OUT/kernels_test.txt" 2>&1; echo "kernels test rc=$?"; grep -E "FAIL" "$OUT/kernels_test.txt" | head; tail -1 "$OUT/kernels_test.txt"
fi
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for arm in with without; do
    extra=(); [ $arm = without ] && extra=(--exclude "$P")
    f="$OUT/validate_${arm}_${round}.txt"
    $Z validate --model $M --dummy-weights --device cuda --max-tokens "${TOKENS:-128}" --runs "${RUNS:-3}" "${extra[@]}" > "$f" 2>&1
    echo "$arm $P round $round rc=$? $(grep -E '^fidelity|tok/s|launches' "$f" | tr '\n' ' ')"
  done
done
