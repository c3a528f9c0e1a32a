set -uo pipefail
export OUT=${OUT:-/tmp/out} ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache ZMLX_PREFILL_LANES=16 ZMLX_DEVICE_SAMPLING=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 140 ./target/release/zmlx kernels test --backend cuda > $OUT/kernels_test.txt 2>&1; echo "kernels test rc=$?"
grep -E "FAIL" $OUT/kernels_test.txt | head -20; grep -E "sample" $OUT/kernels_test.txt | head -12; tail -2 $OUT/kernels_test.txt
PROMPTS="16 600" PATCH_MODES=patched timeout 100 bash scripts/device_prefill.sh > $OUT/prefill_log.txt 2>&1; echo "prefill rc=$?"; cat $OUT/prefill.txt
SKIP_KERNEL_TESTS=1 RUNS_LIST=1 FIXTURES="fixtures/tiny-qwen3-moe-f32 fixtures/tiny-qwen3-moe-bf16" SEEDS="1 2" timeout 150 bash scripts/device_sampling.sh > $OUT/sampling_log.txt 2>&1; echo "sampling rc=$?"; tail -20 $OUT/sampling_log.txt
