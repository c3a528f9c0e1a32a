#!/usr/bin/env python3
"""Oracle for zmlx-core's sampling filters (tests/sampler_vs_mlx_lm.rs).

Usage: oracle_sampler.py CASES.json

CASES.json: a list of {"dtype": "bfloat16"|"float16"|"float32" (MLX's names),
"logprobs": [...], "top_p": float,
"min_p": float, "top_k": int}. For each case, mlx-lm's own filters run in make_sampler's
order (apply_top_p when 0 < top_p < 1, apply_min_p when min_p != 0, apply_top_k when
top_k > 0) on the logprobs as an array of that dtype; prints one JSON line: the list of
kept token ids (finite after the filters) per case.
"""
import json
import sys

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

out = []
for case in json.load(open(sys.argv[1])):
    x = mx.array([case["logprobs"]], dtype=mx.float32).astype(getattr(mx, case["dtype"]))
    if 0 < case["top_p"] < 1.0:
        x = apply_top_p(x, case["top_p"])
    if case["min_p"] != 0.0:
        x = apply_min_p(x, case["min_p"], 1)
    if case["top_k"] > 0:
        x = apply_top_k(x, case["top_k"])
    finite = mx.isfinite(x.astype(mx.float32))[0].tolist()
    out.append([i for i, f in enumerate(finite) if f])
print(json.dumps(out))
