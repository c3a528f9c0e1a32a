#!/usr/bin/env bash
# One device call that checks sampling on the device and prefill lanes (both on by default since
# 2026-12-06, first run by this script): the kernel self-tests (the sampler rows and the mlx-cpu
# rows among them), prefill lanes against the one-at-a-time prefill (scripts/device_prefill.sh,
# prompts of 16 and 600), and sampled decode on the device (scripts/device_sampling.sh, one
# timing run, f32 and bf16 fixtures; min-p on the device vs the host). The environment pins
# both paths on. Logs go to $OUT. Flip DEVICE_MIN_P_DEFAULT in crates/zmlx-models/src/cuda.rs
# once the min-p `sample` rows pass and the min-p tokens match the host sampler's.
set -uo pipefail
export OUT=${OUT:-/tmp/out} ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache ZMLX_PREFILL_LANES=16 ZMLX_DEVICE_SAMPLING=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 140 ./target/release/zmlx kernels test --backend cuda > $OUT/kernels_test.txt 2>&1; echo "kernels test rc=$?"
grep -E "FAIL" $OUT/kernels_test.txt | head -20; grep -E "sample" $OUT/kernels_test.txt | head -14; tail -2 $OUT/kernels_test.txt
PROMPTS="16 600" PATCH_MODES=patched timeout 150 bash scripts/device_prefill.sh > $OUT/prefill_log.txt 2>&1; echo "prefill rc=$?"; cat $OUT/prefill.txt
SKIP_KERNEL_TESTS=1 RUNS_LIST=1 FIXTURES="fixtures/tiny-qwen3-moe-f32 fixtures/tiny-qwen3-moe-bf16" SEEDS=1 timeout 240 bash scripts/device_sampling.sh > $OUT/sampling_log.txt 2>&1
echo "sampling rc=$?"; tail -20 $OUT/sampling_log.txt
