#!/usr/bin/env bash
# Concurrent prompt steps (prefill lanes): `zmlx validate` checks the logits after the prompt
# against the one-at-a-time prefill bit for bit and prints both prompt tok/s; here on dummy
# Qwen3-30B-A3B with prompts of 16, 100, 600 (crosses the 384 attention-variant boundary) and
# 2100 tokens, patched and unpatched, and on every fixture. Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=configs/qwen3-30b-a3b
{
for n in ${PROMPTS:-16 100 600 2100}; do
  P=$(python3 -c "import random; random.seed($n); print(','.join(str(random.randrange(151000)) for _ in range($n)))")
  for mode in ${PATCH_MODES:-patched unpatched}; do
    patch=""; [ "$mode" = unpatched ] && patch=--no-patch
    r=$($Z validate --model $M --dummy-weights --device cuda --prompt-tokens $P --max-tokens 16 --runs 1 --ignore-eos $patch 2>&1)
    echo "prompt $n $mode: $(echo "$r" | grep -E '^prefill|^fidelity' | tr '\n' ' ')"
  done
done
for f in fixtures/*/; do
  r=$($Z validate --model $f --device cuda --prompt-tokens $(seq -s, 1 40) --max-tokens 8 --runs 1 --ignore-eos 2>&1)
  echo "$(basename $f): $(echo "$r" | grep -E '^prefill|^fidelity' | tr '\n' ' ')"
done
} 2>&1 | tee "$OUT/prefill.txt"
r=$($Z validate --model $M --dummy-weights --device cuda --prompt-tokens $(seq -s, 1000 1099) --max-tokens 16 --runs 1 --ignore-eos --no-graph 2>&1); echo "prompt 100 eager: $(echo "$r" | grep -E "^prefill|^fidelity" | tr "\n" " ")" | tee -a "$OUT/prefill.txt"
