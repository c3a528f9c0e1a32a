#!/usr/bin/env bash
# Nsight Systems timeline of decode on dummy Qwen3-30B-A3B (CUDA graph, kernels traced per
# graph node): per kernel, median duration and median "step" = its end minus the previous
# kernel's end (what it adds to the dependent chain, launch and PDL overlap included).
# EXTRA: more zmlx generate flags (e.g. --no-patch). Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
echo "nsys: $NSYS"
TAG=${TAG:-patched}
$NSYS profile --trace=cuda --cuda-graph-trace=node -o /tmp/zmlx_$TAG --force-overwrite true \
  $Z generate --model configs/qwen3-30b-a3b --dummy-weights --device cuda --max-tokens ${TOKENS:-48} \
  --prompt-tokens 1,2,3 ${EXTRA:-} > "$OUT/nsys_$TAG.log" 2>&1
echo "nsys rc=$?"; tail -3 "$OUT/nsys_$TAG.log"
$NSYS stats --report cuda_gpu_trace --format csv --output /tmp/zmlx_$TAG /tmp/zmlx_$TAG.nsys-rep > /dev/null 2>&1
python3 scripts/nsys_steps.py /tmp/zmlx_${TAG}_cuda_gpu_trace.csv | tee "$OUT/nsys_steps_$TAG.txt"
