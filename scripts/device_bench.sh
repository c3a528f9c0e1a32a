#!/usr/bin/env bash
# One device call: CUDA vs the exact-accumulation CPU reference on the quantized fixtures,
# token identity over 200 tokens on dummy Qwen3-30B-A3B, benchmark capsules (unpatched with
# and without graphs, patched, stress), kernel micro-benchmarks. Everything lands in $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=configs/qwen3-30b-a3b
L="$OUT/log.txt"
{
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
for f in fixtures/tiny-qwen3-moe-*; do
  n=$(basename $f)
  $Z validate --model $f --device cuda --reference cpu --no-patch --ignore-eos --max-tokens 32 --runs 1 2>&1 | grep -E '^fidelity|^logits' | tr '\n' ' ' | sed "s|^|cuda-vs-cpu       $n: |"; echo
  $Z validate --model $f --device cuda --reference cpu-exact --no-patch --ignore-eos --max-tokens 32 --runs 1 2>&1 | grep -E '^fidelity|^logits' | tr '\n' ' ' | sed "s|^|cuda-vs-cpu-exact $n: |"; echo
  $Z validate --model $f --device cuda --numerics mlx-cpu --reference cpu --no-patch --ignore-eos --max-tokens 32 --runs 1 2>&1 | grep -E '^fidelity|^logits' | tr '\n' ' ' | sed "s|^|cuda-mlx-cpu-vs-cpu $n: |"; echo
  $Z validate --model $f --device cuda --ignore-eos --max-tokens 32 --runs 2 2>&1 | grep -E '^fidelity|^Patched|speedup' | tr '\n' ' ' | sed "s|^|patched-vs-not    $n: |"; echo
done
echo "== validate dummy $M, 200 tokens"
$Z validate --model $M --dummy-weights --device cuda --max-tokens 200 --runs 3 --json 2>&1 | grep -v '^{' 
$Z validate --model $M --dummy-weights --device cuda --max-tokens 200 --runs 3 --json 2>/dev/null | tail -1 > "$OUT/validate_qwen3_30b.json"
echo "== bench unpatched"
$Z bench --model $M --dummy-weights --device cuda --no-patch --gen-lens 128,512,2048 --runs 3 --graph both --out-dir "$OUT" --name qwen3-30b-a3b-dummy-unpatched 2>&1 | grep -v "run="
echo "== bench patched"
$Z bench --model $M --dummy-weights --device cuda --gen-lens 128,512,2048 --runs 3 --graph on --routing-stats --out-dir "$OUT" --name qwen3-30b-a3b-dummy-patched 2>&1 | grep -v "run="
echo "== stress"
timeout 200 $Z bench --model $M --dummy-weights --device cuda --stress --stress-lens 256,1024 --runs 1 --out-dir "$OUT" --name qwen3-30b-a3b-dummy-stress 2>&1
} > "$L" 2>&1
tail -60 "$L"
