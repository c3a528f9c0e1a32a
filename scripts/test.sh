#!/usr/bin/env bash
# The test command (README and CI): Rust unit tests, MLX oracle tests, fixtures vs live mlx-lm,
# then every CUDA kernel compiled with NVRTC (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "error: .venv/bin/python missing: run .ci/run once (it installs mlx + mlx-lm)"; exit 1; }
export ZMLX_ORACLE_PYTHON="$PWD/.venv/bin/python"
log=$(mktemp)
{ cargo test --release --workspace --exclude zmlx-cuda; cargo test --release -p zmlx-cuda --lib; } 2>&1 | tee "$log"
passed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) s += $i } END { print s + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) s += $i } END { print s + 0 }' "$log")
rm -f "$log"

# CUDA: build with the feature (no toolkit needed) and compile every kernel with PyPI's NVRTC.
nvrtc=$(ls .venv-nvrtc/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.* 2>/dev/null | head -n 1 || true)
[ -n "$nvrtc" ] || { echo "error: NVRTC missing: run .ci/run (it installs nvidia-cuda-nvrtc-cu12 into .venv-nvrtc)"; exit 1; }
cargo build --release --features cuda
ZMLX_NVRTC_LIB="$PWD/$nvrtc" ZMLX_CACHE_DIR="$PWD/target/zmlx-kernel-cache" ./target/release/zmlx kernels check --backend cuda

# Without a GPU, --device cuda must fail with one clear line (cudarc would panic if asked blindly).
if [ ! -e /dev/nvidiactl ]; then
  err=$(./target/release/zmlx generate --model fixtures/tiny-qwen3-moe-4bit --device cuda --prompt-tokens 1,2 2>&1 >/dev/null) && { echo "error: --device cuda succeeded without a GPU"; exit 1; }
  [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && [[ "$err" == error:*"no NVIDIA driver"* ]] || { echo "error: unexpected --device cuda failure: $err"; exit 1; }
  passed=$((passed + 1))
fi

# One closing line for CI: every Rust test above (the kernel check counts as one).
echo "zmlx: $((passed + 1)) passed, ${failed} failed"
