#!/usr/bin/env bash
# One device call: kernel self-tests, CUDA (fast and --numerics mlx-cpu) vs the CPU reference
# on every fixture, patched vs unpatched on CUDA. Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_KERNEL_TESTS:-0}" != 1 ]; then
  $Z kernels test --backend cuda > "$OUT/kernels_test.txt" 2>&1; echo "kernels test rc=$?"; tail -3 "$OUT/kernels_test.txt"
fi
for f in fixtures/tiny-qwen3-moe-*; do
  n=$(basename $f)
  $Z validate --model $f --device cuda --reference cpu --no-patch --max-tokens 32 --runs 1 --json > "$OUT/cpu_$n.txt" 2>&1
  echo "cuda-vs-cpu $n rc=$? $(grep -E '^fidelity|^logits' "$OUT/cpu_$n.txt" | tr '\n' ' ')"
  $Z validate --model $f --device cuda --numerics mlx-cpu --reference cpu --no-patch --ignore-eos --max-tokens 32 --runs 1 --json > "$OUT/mlxcpu_$n.txt" 2>&1
  echo "cuda(mlx-cpu)-vs-cpu $n rc=$? $(grep -E '^fidelity|^logits' "$OUT/mlxcpu_$n.txt" | tr '\n' ' ')"
  $Z validate --model $f --device cuda --max-tokens 32 --runs 2 > "$OUT/patch_$n.txt" 2>&1
  echo "patched     $n rc=$? $(grep -E '^fidelity|^Patched|speedup' "$OUT/patch_$n.txt" | tr '\n' ' ')"
done
