set -uo pipefail
export OUT=${OUT:-/tmp/out} ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
./target/release/zmlx kernels test --backend cuda > $OUT/kernels_test.txt 2>&1; echo "kernels test rc=$?"
grep -E "FAIL" $OUT/kernels_test.txt | head -20; grep -E "sample" $OUT/kernels_test.txt | head -12; tail -2 $OUT/kernels_test.txt
timeout 200 bash scripts/device_prefill.sh > $OUT/prefill_log.txt 2>&1; echo "prefill rc=$?"; cat $OUT/prefill.txt
SKIP_KERNEL_TESTS=1 timeout 240 bash scripts/device_sampling.sh > $OUT/sampling_log.txt 2>&1; echo "sampling rc=$?"; tail -20 $OUT/sampling_log.txt
