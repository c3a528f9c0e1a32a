#!/usr/bin/env bash
# Sampling on the device: kernel self-tests (sample rows among all the others), sampled decode
# speed next to greedy on dummy Qwen3-30B-A3B (graph, patched), reproducibility (same seed,
# look-ahead off, eager), and CPU vs CUDA sampled tokens on the f32 fixtures. Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=configs/qwen3-30b-a3b
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${SKIP_KERNEL_TESTS:-0}" != 1 ]; then
  $Z kernels test --backend cuda > "$OUT/kernels_test.txt" 2>&1; echo "kernels test rc=$?"
  grep -E "FAIL" "$OUT/kernels_test.txt" | head; grep -E "^ *sample|sample " "$OUT/kernels_test.txt" | head -20; tail -2 "$OUT/kernels_test.txt"
fi
P=$(seq -s, 100 115)
gen() { $Z generate --model $M --dummy-weights --device cuda --prompt-tokens $P --max-tokens ${TOKENS:-128} --ignore-eos --json "$@" 2>>"$OUT/gen_stderr.txt" | tail -1; }
tps() { python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("%.1f" % d["generation_tps"])'; }
toks() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["tokens"])'; }
{
for run in ${RUNS_LIST:-1 2}; do
  echo "run $run greedy $(gen | tps) | temp0.7 top_p0.9 $(gen --temp 0.7 --top-p 0.9 --seed 1 | tps) | temp1 $(gen --temp 1 --seed 1 | tps) | top_k40 $(gen --temp 0.8 --top-k 40 --seed 1 | tps) | top_p0.9 top_k40 $(gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 1 | tps)"
done
a=$(gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 | toks)
b=$(gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 | toks)
c=$(ZMLX_LOOKAHEAD=0 gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 | toks)
d=$(gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 --no-graph | toks)
e=$(gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 8 | toks)
h=$(ZMLX_DEVICE_SAMPLING=0 gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 | toks)
echo "device vs host sampler (same logits, host lse in CPU order): $(python3 -c "a=$a; b=$h; print(sum(x==y for x,y in zip(a,b)), '/', len(a), 'identical; first difference at', next((i for i,(x,y) in enumerate(zip(a,b)) if x!=y), None))")"
# min-p on the device (ZMLX_DEVICE_MIN_P=1) vs on the host, and its speed
md=$(ZMLX_DEVICE_MIN_P=1 gen --temp 0.8 --top-p 0.9 --min-p 0.05 --seed 7 | toks)
mh=$(ZMLX_DEVICE_MIN_P=0 gen --temp 0.8 --top-p 0.9 --min-p 0.05 --seed 7 | toks)
echo "min-p device vs host sampler: $(python3 -c "a=$md; b=$mh; print(sum(x==y for x,y in zip(a,b)), '/', len(a), 'identical')")"
echo "min-p 0.05 tok/s: device $(ZMLX_DEVICE_MIN_P=1 gen --temp 0.8 --min-p 0.05 --seed 1 | tps), host $(ZMLX_DEVICE_MIN_P=0 gen --temp 0.8 --min-p 0.05 --seed 1 | tps)"
echo "same seed: $([ "$a" = "$b" ] && echo identical || echo DIFFER); look-ahead off: $([ "$a" = "$c" ] && echo identical || echo DIFFER); eager: $([ "$a" = "$d" ] && echo identical || echo DIFFER); other seed: $([ "$a" = "$e" ] && echo SAME || echo differs)"
echo "seed 7 tokens: ${a:0:200}"
} 2>&1 | tee "$OUT/sampled_decode.txt"
# CPU vs CUDA sampled tokens (fast numerics on the device; f32 fixtures agree to ~1e-6).
for f in ${FIXTURES:-fixtures/tiny-qwen3-moe-f32 fixtures/tiny-qwen3-moe-f32-4bit fixtures/tiny-qwen3-moe-4bit fixtures/tiny-qwen3-moe-bf16}; do
  for seed in ${SEEDS:-1 2 3}; do
    args="--model $f --prompt-tokens 1,2,3,4,5 --max-tokens 32 --ignore-eos --temp 0.9 --top-p 0.95 --top-k 30 --seed $seed --json"
    cpu=$($Z generate $args --device cpu 2>/dev/null | tail -1 | toks)
    gpu=$($Z generate $args --device cuda 2>/dev/null | tail -1 | toks)
    mc=$($Z generate $args --device cuda --numerics mlx-cpu 2>/dev/null | tail -1 | toks)
    same=$(python3 -c "import sys; a=$cpu; b=$gpu; c=$mc; print(sum(x==y for x,y in zip(a,b)), '/', len(a), 'device sampler;', sum(x==y for x,y in zip(a,c)), '/', len(a), 'mlx-cpu numerics')")
    echo "$(basename $f) seed $seed: CPU vs CUDA $same"
  done
done 2>&1 | tee "$OUT/cpu_vs_cuda_sampled.txt"
