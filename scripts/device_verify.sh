#!/usr/bin/env bash
# One short device call that checks what this stop could not run on a GPU: the kernel
# self-tests (the sampler rows and the mlx-cpu rows among them), prefill lanes against the
# one-at-a-time prefill (zmlx validate, prompts of 16 and 600), and sampled decode on the
# device (speed next to greedy, same seed twice, look-ahead off, host sampler, CPU vs CUDA on
# the f32 fixture). Both new paths are switched on by the environment here. Logs go to $OUT.
set -uo pipefail
export OUT=${OUT:-/tmp/out} ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache ZMLX_PREFILL_LANES=16 ZMLX_DEVICE_SAMPLING=1
Z=./target/release/zmlx; M=configs/qwen3-30b-a3b
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 110 $Z kernels test --backend cuda > $OUT/kernels_test.txt 2>&1; echo "kernels test rc=$?"
grep -E "FAIL" $OUT/kernels_test.txt | head -20; grep -E "sample" $OUT/kernels_test.txt | head -12; tail -2 $OUT/kernels_test.txt
PROMPTS="16 600" PATCH_MODES=patched timeout 80 bash scripts/device_prefill.sh > $OUT/prefill_log.txt 2>&1; echo "prefill rc=$?"; cat $OUT/prefill.txt
P=$(seq -s, 100 115)
gen() { timeout 30 $Z generate --model $M --dummy-weights --device cuda --prompt-tokens $P --max-tokens 128 --ignore-eos --json "$@" 2>>"$OUT/gen_stderr.txt" | tail -1; }
f() { python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("%.1f tok/s" % d["generation_tps"], d["tokens"][:12])' 2>&1; }
{
echo "greedy: $(gen | f)"
echo "temp0.7 top_p0.9: $(gen --temp 0.7 --top-p 0.9 --seed 1 | f)"
echo "temp0.8 top_p0.9 top_k40 seed7: $(gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 | f)"
echo "  again: $(gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 | f)"
echo "  look-ahead off: $(ZMLX_LOOKAHEAD=0 gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 | f)"
echo "  host sampler: $(ZMLX_DEVICE_SAMPLING=0 gen --temp 0.8 --top-p 0.9 --top-k 40 --seed 7 | f)"
for d in cpu cuda; do echo "f32 fixture $d: $(timeout 20 $Z generate --model fixtures/tiny-qwen3-moe-f32 --prompt-tokens 1,2,3,4,5 --max-tokens 24 --ignore-eos --temp 0.9 --top-p 0.95 --top-k 30 --seed 3 --json --device $d 2>/dev/null | tail -1 | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["tokens"])')"; done
} 2>&1 | tee $OUT/sampled.txt
