#!/usr/bin/env bash
# A/B of an environment knob on patched decode (dummy Qwen3-30B-A3B, CUDA): `zmlx validate`
# with $AB_ENV=$AB_ON and $AB_ENV=$AB_OFF alternated $AB_ROUNDS times, for each of $TOKENS.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
V=${AB_ENV:?set AB_ENV}
for n in ${TOKENS:-128}; do
  for round in $(seq 1 "${AB_ROUNDS:-2}"); do
    for val in "${AB_ON:-1}" "${AB_OFF:-0}"; do
      r=$(env "$V=$val" $Z validate --model configs/qwen3-30b-a3b --dummy-weights --device cuda --max-tokens "$n" --runs "${RUNS:-3}" 2>&1 | grep -E '^fidelity|tok/s|launches' | tr '\n' ' ')
      echo "$V=$val tokens=$n round $round: $r"
    done
  done
done
