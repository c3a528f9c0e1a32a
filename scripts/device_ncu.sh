#!/usr/bin/env bash
# Nsight Compute profile of the decode kernels on dummy Qwen3-30B-A3B (CUDA, patched preset):
# per-kernel duration, DRAM throughput, issue-slot use, warp stall reasons. Clocks are left as
# they run (--clock-control none), caches flushed before each profiled kernel (weights are not
# L2-resident in real decode either). KERNELS: an ncu -k regex; NCU_EXTRA: more ncu options (e.g.
# "--section SourceCounters" for the stall reasons by instruction). Logs go to $OUT.
set -uo pipefail
Z=./target/release/zmlx
export ZMLX_CACHE_DIR=$PWD/target/zmlx-kernel-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NCU=/usr/local/cuda/bin/ncu
K=${KERNELS:-regex:fused_swiglu|fused_combine|fused_qmv_multi|qmv_bf16_b4_g64_r1|qmv_bf16_b4_g64_r4|attn_single_qknr}
$NCU --clock-control none -k "$K" --launch-skip ${SKIP:-60} --launch-count ${COUNT:-12} \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats ${NCU_EXTRA:-} \
  $Z generate --model configs/qwen3-30b-a3b --dummy-weights --device cuda --max-tokens 6 \
  --prompt-tokens 1,2,3 ${EXTRA:-} > "$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"
grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Issue Slots Busy|Registers Per|Achieved Occupancy|Waves Per SM|Executed Ipc A|Stall|Warp Cycles Per Issued" "$OUT/ncu.txt" | head -150
