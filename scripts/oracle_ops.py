#!/usr/bin/env python3
"""Oracle for zmlx-core's MLX-exact ops (crates/zmlx-core/tests/ops_vs_mlx.rs).

Usage: oracle_ops.py OUT.safetensors [SEED]

With a fixed seed (or SEED), draws fresh random inputs (normal, varied scales,
never zero unless a test sweeps every bit pattern) and records MLX's CPU results
for: exp/sin/cos (f32), sigmoid/silu/swiglu (every finite bf16), fast.rms_norm,
fast.rope, softmax(precise), logsumexp, argmax, argpartition, fast sdpa, matmul
and sum. Every tensor is named

    {op}/{k1=v1,k2=v2,...}/{field}

The middle part holds the case's parameters (always includes dtype=...); the
Rust test groups tensors by everything before the last '/'.
"""
import math
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu

DT = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}

tensors = {}
rng = None


def put(op, params, field, arr):
    key = ",".join(f"{k}={v}" for k, v in params.items())
    name = f"{op}/{key}/{field}"
    assert name not in tensors, name
    tensors[name] = arr


def nonzero(x, scale):
    """Replace exact zeros (after rounding to the dtype) with +-scale/2."""
    xf = np.array(x.astype(mx.float32))
    if (xf == 0).any():
        signs = np.where(rng.random(xf.shape) < 0.5, -1.0, 1.0)
        xf = np.where(xf == 0, signs * scale * 0.5, xf).astype(np.float32)
        x = mx.array(xf).astype(x.dtype)
    return x


def randn(shape, dtype, scale=1.0, mean=0.0):
    a = (rng.standard_normal(shape) * scale + mean).astype(np.float32)
    return nonzero(mx.array(a).astype(dtype), scale)


def rand_scaled_rows(shape, dtype, scales):
    """Normal rows, each with its own scale from `scales` (cycled)."""
    rows = int(np.prod(shape[:-1]))
    s = np.array([scales[i % len(scales)] for i in range(rows)], dtype=np.float64)
    a = rng.standard_normal((rows, shape[-1])) * s[:, None]
    a = a.reshape(shape).astype(np.float32)
    return nonzero(mx.array(a).astype(dtype), min(scales))


def all_finite_bf16():
    bits = np.arange(65536, dtype=np.uint32)
    bits = bits[(bits & 0x7F80) != 0x7F80].astype(np.uint16)
    return mx.array(bits).view(mx.bfloat16)


def f32_from(np_arr):
    return mx.array(np.asarray(np_arr, dtype=np.float32))


def exp_edge_cases():
    """Values where `floor(x*log2e + 0.5)` computed in float would differ from
    MLX's (double) evaluation, plus the +-88 clamps."""
    out = [88.0, -88.0, 87.99999, -87.99999, 88.00001, -88.00001, 87.5, -87.5,
           88.72, -87.33, -103.0, 100.0, 1e-30, -1e-30, 1e-7, -1e-7]
    c = np.float32(1.442695)
    for n in range(-127, 128):
        for t in [np.float32(n + 0.5), np.nextafter(np.float32(n + 0.5), np.float32(-1e9)),
                  np.nextafter(np.float32(n + 0.5), np.float32(1e9))]:
            x0 = np.float32(float(t) / float(c))
            for d in range(-4, 5):
                x = x0
                for _ in range(abs(d)):
                    x = np.nextafter(x, np.float32(math.copysign(1e9, d)))
                out.append(float(x))
    # Note: MLX computes floor(x + 0.5) in double (0.5 is a double literal). In
    # float, x + 0.5 would round up to 1.0 only for x = 0.5 - 2^-25, and no
    # float32 x_init has x_init * 1.442695f equal to that, so the neighbourhoods
    # of every n + 0.5 above are what can be tested.
    return np.array([v for v in out if v != 0.0], dtype=np.float32)


def gen_mlx_math():
    n = 40000
    # exp
    parts = [rng.standard_normal(n) * s for s in [0.01, 0.3, 1.0, 5.0, 20.0, 40.0]]
    parts.append(rng.uniform(-90.0, 90.0, n))
    parts.append(exp_edge_cases())
    x = f32_from(np.concatenate(parts))
    x = nonzero(x, 1.0)
    put("exp", {"dtype": "f32"}, "x", x)
    put("exp", {"dtype": "f32"}, "y", mx.exp(x))
    # sin / cos, including RoPE-like thetas (positions up to ~1.3e5) and > 2^23 (libm path).
    parts = [rng.standard_normal(n) * s for s in [0.1, 1.0, 10.0, 1000.0]]
    parts.append(rng.uniform(0.0, 2e5, n))
    parts.append(rng.uniform(-1.3e5, 1.3e5, n))
    parts.append(rng.uniform(-2e7, 2e7, 4000))
    parts.append(np.array([8388607.0, 8388608.0, 8388609.0, -8388609.0, 1e9, -3e8, 1e30]))
    # Genuine RoPE thetas: position * inv_freq, as mx.fast.rope's fallback makes them.
    for base, half in [(10000.0, 32), (1e6, 64), (5e5, 16)]:
        inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(math.log(base) / half, mx.float32))
        pos = mx.array(rng.integers(0, 131072, 300).astype(np.float32))
        parts.append(np.array((pos[:, None] * inv[None, :]).reshape(-1)))
    x = nonzero(f32_from(np.concatenate(parts)), 1.0)
    put("sin", {"dtype": "f32"}, "x", x)
    put("sin", {"dtype": "f32"}, "y", mx.sin(x))
    put("cos", {"dtype": "f32"}, "x", x)
    put("cos", {"dtype": "f32"}, "y", mx.cos(x))

    # sigmoid / silu / swiglu on every finite bf16.
    g = all_finite_bf16()
    put("sigmoid", {"dtype": "bf16"}, "x", g)
    put("sigmoid", {"dtype": "bf16"}, "y", mx.sigmoid(g))
    put("silu", {"dtype": "bf16"}, "x", g)
    put("silu", {"dtype": "bf16"}, "y", nn.silu(g))
    scales = [0.01, 0.1, 1.0, 3.0, 10.0]
    up = rand_scaled_rows((g.size // 5 + 1, 5), mx.bfloat16, scales).reshape(-1)[: g.size]
    put("swiglu", {"dtype": "bf16", "up": "normal"}, "gate", g)
    put("swiglu", {"dtype": "bf16", "up": "normal"}, "up", up)
    put("swiglu", {"dtype": "bf16", "up": "normal"}, "y", swiglu(g, up))
    perm = mx.array(rng.permutation(g.size).astype(np.uint32))
    up2 = g[perm]
    put("swiglu", {"dtype": "bf16", "up": "allbits"}, "gate", g)
    put("swiglu", {"dtype": "bf16", "up": "allbits"}, "up", up2)
    put("swiglu", {"dtype": "bf16", "up": "allbits"}, "y", swiglu(g, up2))
    # sigmoid on f32 too (router gates of some models).
    xs = nonzero(f32_from(np.concatenate([rng.standard_normal(n) * s for s in [0.1, 1.0, 8.0, 40.0]])), 1.0)
    put("sigmoid", {"dtype": "f32"}, "x", xs)
    put("sigmoid", {"dtype": "f32"}, "y", mx.sigmoid(xs))


def gen_rms_norm():
    for dn, dt in DT.items():
        for d in [16, 32, 64, 2048]:
            for eps in [1e-6, 1e-5]:
                x = rand_scaled_rows((6, d), dt, [0.01, 0.1, 1.0, 3.0, 10.0, 40.0])
                w = randn((d,), dt, scale=float(rng.choice([0.05, 0.3])), mean=float(rng.choice([0.0, 1.0])))
                p = {"dtype": dn, "D": d, "eps": repr(eps)}
                put("rms_norm", p, "x", x)
                put("rms_norm", p, "w", w)
                put("rms_norm", p, "y", mx.fast.rms_norm(x, w, eps))


def gen_rope():
    heads = 4
    for dn in ["bf16", "f32"]:
        dt = DT[dn]
        for d in [32, 64, 128]:
            for base in [10000.0, 1e6]:
                for off in [0, 7, 1000, 40000]:
                    for L in [1, 5]:
                        x = rand_scaled_rows((1, heads, L, d), dt, [0.1, 1.0, 4.0])
                        y = mx.fast.rope(x, d, traditional=False, base=base, scale=1.0, offset=off)
                        p = {"dtype": dn, "D": d, "H": heads, "L": L, "base": repr(base), "off": off}
                        put("rope", p, "x", x)
                        put("rope", p, "y", y)


def gen_softmax_family():
    shapes = [(4, 8), (4, 16), (4, 60), (4, 128), (2, 1000), (1, 32003)]
    for dn in ["bf16", "f32"]:
        dt = DT[dn]
        for r, c in shapes:
            for s in [1.0, 4.0, 20.0]:
                x = rand_scaled_rows((r, c), dt, [s, s * 0.5])
                p = {"dtype": dn, "R": r, "C": c, "s": s}
                put("softmax", p, "x", x)
                put("softmax", p, "y", mx.softmax(x, axis=-1, precise=True))
                put("logsumexp", p, "x", x)
                put("logsumexp", p, "y", mx.logsumexp(x, axis=-1, keepdims=True))
                put("argmax", p, "x", x)
                put("argmax", p, "y", mx.argmax(x, axis=-1).astype(mx.uint32))


def gen_argpartition():
    rows = 64
    for dn in ["bf16", "f32"]:
        dt = DT[dn]
        for e in [8, 16, 60, 128]:
            for k in [2, 4, 8]:
                for s in [1.0, 3.0]:
                    logits = rand_scaled_rows((rows, e), dt, [s])
                    g = mx.softmax(logits, axis=-1, precise=True)
                    inds = mx.argpartition(g, kth=-k, axis=-1)
                    p = {"dtype": dn, "E": e, "k": k, "s": s}
                    put("argpartition", p, "g", g)
                    put("argpartition", p, "inds", inds.astype(mx.uint32))


def gen_sdpa():
    for dn in ["bf16", "f32"]:
        dt = DT[dn]
        for d in [16, 32, 64, 128]:
            for hq, hkv in [(4, 2), (8, 8)]:
                # Decode: one query, no mask.
                for s_len in [1, 7, 33]:
                    q = randn((1, hq, 1, d), dt, scale=float(rng.choice([0.5, 1.0, 3.0])))
                    k = randn((1, hkv, s_len, d), dt, scale=float(rng.choice([0.5, 1.0, 3.0])))
                    v = randn((1, hkv, s_len, d), dt)
                    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, mask=None)
                    p = {"dtype": dn, "D": d, "Hq": hq, "Hkv": hkv, "L": 1, "S": s_len, "causal": 0}
                    for f, a in [("q", q), ("k", k), ("v", v), ("o", o)]:
                        put("sdpa", p, f, a)
                # Prefill chunk: 5 queries, causal, after `off` cached positions.
                for off in [0, 3, 20]:
                    s_len = off + 5
                    q = randn((1, hq, 5, d), dt, scale=float(rng.choice([0.5, 1.0, 3.0])))
                    k = randn((1, hkv, s_len, d), dt, scale=float(rng.choice([0.5, 1.0, 3.0])))
                    v = randn((1, hkv, s_len, d), dt)
                    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, mask="causal")
                    p = {"dtype": dn, "D": d, "Hq": hq, "Hkv": hkv, "L": 5, "S": s_len, "causal": 1}
                    for f, a in [("q", q), ("k", k), ("v", v), ("o", o)]:
                        put("sdpa", p, f, a)


def gen_matmul_sum():
    for dn in ["bf16", "f32"]:
        dt = DT[dn]
        for kdim in [16, 17, 64, 100, 2048]:
            for n in [5, 33, 64]:
                x = rand_scaled_rows((3, kdim), dt, [0.1, 1.0, 5.0])
                w = randn((n, kdim), dt, scale=float(rng.choice([0.02, 0.2, 1.0])))
                p = {"dtype": dn, "K": kdim, "N": n}
                put("matmul", p, "x", x)
                put("matmul", p, "w", w)
                put("matmul", p, "y", x @ w.T)
        # Sum over the expert axis (mlx-lm's MoE combine) and over the last axis.
        for k in [2, 4, 8]:
            for d in [64, 2048]:
                y = rand_scaled_rows((k, d), dt, [0.1, 1.0, 7.0])
                p = {"dtype": dn, "k": k, "D": d}
                put("sum_axis0", p, "x", y)
                put("sum_axis0", p, "y", mx.sum(y, axis=-2))
        for c in [8, 60, 2048]:
            y = rand_scaled_rows((4, c), dt, [0.1, 1.0, 7.0])
            p = {"dtype": dn, "C": c}
            put("sum_last", p, "x", y)
            put("sum_last", p, "y", mx.sum(y, axis=-1))


def main():
    global rng
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: oracle_ops.py OUT.safetensors [SEED]")
    out_path = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) == 3 else 20250117
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(seed)
    gen_mlx_math()
    gen_rms_norm()
    gen_rope()
    gen_softmax_family()
    gen_argpartition()
    gen_sdpa()
    gen_matmul_sum()
    for a in tensors.values():
        mx.eval(a)
    mx.save_safetensors(
        out_path,
        {k: mx.contiguous(v) for k, v in tensors.items()},
        metadata={"mlx": mx.__version__, "seed": str(seed)},
    )
    print(f"wrote {len(tensors)} tensors to {out_path} (seed {seed}, mlx {mx.__version__})")


if __name__ == "__main__":
    main()
