#!/usr/bin/env python3
"""Oracle for zmlx-core's MLX affine quantization (crates/zmlx-core/tests/quant_vs_mlx.rs).

Usage: oracle_quant.py OUT.safetensors

With a fixed seed, for every bits in {2,3,4,5,6,8} x group_size in {32,64,128} x dtype in
{float32,float16,bfloat16} and a few shapes, draws fresh random weights and inputs, and
records MLX's (CPU) results of mx.quantize, mx.dequantize and
mx.quantized_matmul(transpose=True). Every tensor of a case is named

    case{idx:03d}_b{bits}_g{group}_{dtype}_r{rows}_c{cols}_m{m}.{field}

with field in: w (input weights, dtype), wq (uint32 packed), scales, biases (dtype),
deq (mx.dequantize of wq/scales/biases, dtype), x ([m, cols], dtype), y ([m, rows], dtype).
"""
import sys

import mlx.core as mx
import numpy as np

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# (rows, cols): rows deliberately include odd counts; cols are multiples of 128.
SHAPES = [(8, 128), (16, 256), (33, 256), (8, 512), (24, 256), (72, 128), (12, 384)]
CASES_PER_COMBO = 2
# A few larger cases, above zmlx's rayon threshold (2^16 weights), so the parallel
# paths are checked against MLX too.
BIG = {(4, 64, "bfloat16", 0), (3, 128, "float16", 1)}
BIG_SHAPE = (136, 512)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: oracle_quant.py OUT.safetensors")
    out_path = sys.argv[1]
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(20240611)
    tensors = {}
    idx = 0
    for bits in BITS:
        for group in GROUPS:
            for dname, dt in DTYPES.items():
                for rep in range(CASES_PER_COMBO):
                    rows, cols = SHAPES[idx % len(SHAPES)]
                    m = 1 if rep == 0 else 3
                    if (bits, group, dname, rep) in BIG:
                        rows, cols = BIG_SHAPE
                    std = float(rng.choice([0.02, 0.3, 1.0, 4.0]))
                    w = rng.standard_normal((rows, cols)) * std
                    # Some rows get an offset so that whole groups are one-signed
                    # (exercises the negative-scale edge of MLX's scale/bias choice).
                    offs = rng.choice([0.0, 0.0, 2.0, -2.0], size=(rows, 1)) * std
                    w = w + offs
                    # Occasionally a constant (non-zero) group: scale hits the eps clamp.
                    if rep == 1 and rows > 2:
                        w[1, :group] = 0.75 * std
                    w = w.astype(np.float32)
                    x = (rng.standard_normal((m, cols)) * float(rng.choice([0.5, 1.0, 2.0]))).astype(np.float32)
                    w_mx = mx.array(w).astype(dt)
                    x_mx = mx.array(x).astype(dt)
                    wq, scales, biases = mx.quantize(w_mx, group_size=group, bits=bits)
                    deq = mx.dequantize(wq, scales, biases, group_size=group, bits=bits)
                    y = mx.quantized_matmul(
                        x_mx, wq, scales, biases, transpose=True, group_size=group, bits=bits
                    )
                    assert wq.dtype == mx.uint32 and scales.dtype == dt and deq.dtype == dt and y.dtype == dt
                    assert wq.shape == (rows, cols * bits // 32)
                    assert y.shape == (m, rows)
                    name = f"case{idx:03d}_b{bits}_g{group}_{dname}_r{rows}_c{cols}_m{m}"
                    for field, arr in (
                        ("w", w_mx), ("wq", wq), ("scales", scales), ("biases", biases),
                        ("deq", deq), ("x", x_mx), ("y", y),
                    ):
                        tensors[f"{name}.{field}"] = arr
                    idx += 1
    mx.eval(list(tensors.values()))
    mx.save_safetensors(
        out_path, tensors,
        metadata={"generator": "scripts/oracle_quant.py", "mlx_version": mx.__version__, "cases": str(idx)},
    )
    print(f"wrote {idx} cases to {out_path} (mlx {mx.__version__})")


if __name__ == "__main__":
    main()
