#!/usr/bin/env bash
# The stop's measurements in one device call, with the shipped defaults: benchmark capsules on
# dummy Qwen3-30B-A3B (unpatched with and without graphs, patched with routing stats; prompts
# of 16 and 600 tokens, so prefill lanes show in prompt_tps), 200-token patched-vs-unpatched
# validation as JSON, sampled decode (scripts/device_sampling.sh) and prefill checks
# (scripts/device_prefill.sh). Everything goes to $OUT/capsules.tar (the device tool returns at
# most 8 files); copy the capsules to benchmarks/capsules/ with the commit in their names.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
TAR_TO=${OUT:-/tmp/out}; OUT=$TAR_TO/capsules; mkdir -p "$OUT"
trap 'tar -C "$TAR_TO" -cf "$TAR_TO/capsules.tar" capsules && rm -rf "$OUT"' EXIT
M=configs/qwen3-30b-a3b
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=(--model $M --dummy-weights --device cuda --prompt-lens 16,600 --gen-lens 128,512,2048 --runs 3 --out-dir "$OUT")
$Z bench "${B[@]}" --no-patch --graph both --name qwen3-30b-a3b-dummy-unpatched 2>&1 | grep -v "run=" | tail -14
$Z bench "${B[@]}" --graph on --routing-stats --name qwen3-30b-a3b-dummy-patched 2>&1 | grep -v "run=" | tail -10
$Z validate --model $M --dummy-weights --device cuda --max-tokens 200 --runs 3 --json 2>/dev/null | tail -1 > "$OUT/qwen3-30b-a3b-dummy-validate-200.json"
python3 -c "import json; d=json.load(open('$OUT/qwen3-30b-a3b-dummy-validate-200.json')); print('validate 200:', d['fidelity'], d['baseline_tps'], d['patched_tps'], d['speedup'])"
SKIP_KERNEL_TESTS=1 RUNS_LIST="1 2" SEEDS="1 2" OUT=$OUT bash scripts/device_sampling.sh 2>&1 | tail -14
PROMPTS="16 100 600 2100" OUT=$OUT bash scripts/device_prefill.sh 2>&1 | grep -E "^prompt"
