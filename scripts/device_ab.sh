#!/usr/bin/env bash
# A/B of one pattern on dummy Qwen3-30B-A3B (CUDA): kernel self-tests, then `zmlx validate`
# with the family preset plus $AB_PATTERN and with the preset minus it, alternated
# $AB_ROUNDS times (each validate reports medians over --runs). Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=configs/qwen3-30b-a3b
P=${AB_PATTERN:?set AB_PATTERN}
# the preset's patterns, from `zmlx patch list`
PRESET=$($Z patch list --model $M --device cuda 2>/dev/null | awk '$2 == "yes" && $1 != "moe_mlp" {print $1}' | paste -sd, -)
echo "preset: $PRESET"
if [ "${SKIP_KERNEL_TESTS:-0}" != 1 ]; then
  $Z kernels test --backend cuda > "$OUT/kernels_test.txt" 2>&1; echo "kernels test rc=$?"; grep -E "FAIL" "$OUT/kernels_test.txt" | head; tail -1 "$OUT/kernels_test.txt"
fi
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for arm in with without; do
    if [ $arm = with ]; then sel=(--patterns "$PRESET,$P"); else sel=(--patterns "$PRESET" --exclude "$P"); fi
    f="$OUT/validate_${arm}_${round}.txt"
    $Z validate --model $M --dummy-weights --device cuda --max-tokens "${TOKENS:-128}" --runs "${RUNS:-3}" "${sel[@]}" > "$f" 2>&1
    echo "$arm $P round $round rc=$? $(grep -E '^Patched|^fidelity|tok/s|launches' "$f" | tr '\n' ' ')"
  done
done
