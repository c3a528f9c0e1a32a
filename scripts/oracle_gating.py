#!/usr/bin/env python3
"""Oracle for zmlx-core's group_expert_select (tests/gating_vs_mlx_lm.rs).

Usage: oracle_gating.py CASES.json

CASES.json: a list of {"dtype": "bfloat16"|"float16"|"float32" (MLX's names),
"gates": [...], "bias": [...], "top_k",
"n_group", "topk_group", "scale", "norm"}. For each case, mlx-lm's own
`mlx_lm.models.deepseek_v3.group_expert_select` runs on the gates as an array of that dtype
(the router's output dtype) and the bias as f32; prints one JSON line: per case
[expert ids in mlx-lm's order, weights as f32 bit patterns].
"""
import json
import sys

import mlx.core as mx
import numpy as np
from mlx_lm.models.deepseek_v3 import group_expert_select

out = []
for c in json.load(open(sys.argv[1])):
    gates = mx.array([c["gates"]], dtype=mx.float32).astype(getattr(mx, c["dtype"]))
    bias = mx.array(c["bias"], dtype=mx.float32)
    inds, scores = group_expert_select(gates, bias, c["top_k"], c["n_group"], c["topk_group"], c["scale"], c["norm"])
    w = np.array(scores.astype(mx.float32)[0]).view(np.uint32).tolist()
    out.append([inds[0].tolist(), w])
print(json.dumps(out))
