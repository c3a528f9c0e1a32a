#!/usr/bin/env bash
# The test command (README and CI): Rust unit tests, MLX oracle tests, fixtures vs live mlx-lm.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "error: .venv/bin/python missing: run .ci/run once (it installs mlx + mlx-lm)"; exit 1; }
export ZMLX_ORACLE_PYTHON="$PWD/.venv/bin/python"
cargo test --release --workspace --exclude zmlx-cuda
