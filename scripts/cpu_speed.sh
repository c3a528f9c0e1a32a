#!/usr/bin/env bash
# CPU decode speed, zmlx vs mlx-lm side by side on one fixture (3 runs each, 128 tokens).
set -e
M=fixtures/tiny-qwen3-moe-4bit
for r in 1 2 3; do
./target/release/zmlx generate --model $M --prompt-tokens 5,17,42,99 --max-tokens 128 --json | tail -1 | python3 -c "import json,sys; d=json.load(sys.stdin); print('zmlx', d['generation_tokens'], round(d['generation_tps'],1), d['finish_reason'])"
.venv/bin/python scripts/oracle_generate.py --model $M --prompt-tokens 5,17,42,99 --max-tokens 128 --time | tail -1 | python3 -c "import json,sys; d=json.load(sys.stdin); print('mlx-lm', d['generation_tokens'], round(d['generation_tps'],1), d['finish_reason'])"
done
