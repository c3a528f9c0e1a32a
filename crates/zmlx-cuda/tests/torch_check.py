#!/usr/bin/env python3
"""Cross-check zmlx-cuda kernel outputs with PyTorch in float64.

usage: python3 torch_check.py DUMP_DIR   (DUMP_DIR written by `selftest --dump DUMP_DIR`)

Independent of the Rust references: codes are unpacked with numpy.unpackbits from the
little-endian byte stream, dequantized as scale*q + bias and multiplied in torch float64;
attention scales q as MLX does (q * scale in the dtype) and runs softmax in float64.
Tolerance per element: 1 ulp of the dtype at the reference + 1e-5 * sum|terms|
(f32: 4 ulp + 1e-6 * sum|terms|); relative-norm bound bf16 2.5e-3, f16 4e-4, f32 1e-5.
"""
import json, os, sys
import numpy as np
import torch

TDT = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
MANT = {"bf16": 7, "f16": 10, "f32": 23}
NORM = {"bf16": 2.5e-3, "f16": 4e-4, "f32": 1e-5}
dev = "cuda" if torch.cuda.is_available() else "cpu"


def arr(d, name, dt):
    return np.fromfile(os.path.join(d, name), dtype=dt)


def codes(words_u32, rows, k, bits):
    b = np.unpackbits(words_u32.view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    b = b[:, : k * bits].reshape(rows, k, bits).astype(np.int64)
    return (b << np.arange(bits, dtype=np.int64)).sum(axis=2)


def ulp(ref, dt):
    e = torch.floor(torch.log2(ref.abs().clamp_min(1e-300)))
    e = e.clamp_min(-14 if dt == "f16" else -126)
    return torch.pow(2.0, e - MANT[dt])


def compare(out, ref, scale, dt):
    err = (out - ref).abs()
    tol = (4 * ulp(ref, dt) + 1e-6 * scale) if dt == "f32" else (ulp(ref, dt) + 1e-5 * scale)
    bad = (~torch.isfinite(out)).sum().item()
    worst = (err / tol).max().item()
    rel = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
    return worst, rel, bad


def check_q(d, m):
    n, k, bits, gs, e, slots = m["n"], m["k"], m["bits"], m["gs"], m["e"], m["slots"]
    words = arr(d, "words.u32", np.uint32).reshape(e, n, -1)
    sc = arr(d, "scales.f32", np.float32).reshape(e, n, k // gs)
    bi = arr(d, "biases.f32", np.float32).reshape(e, n, k // gs)
    x = torch.from_numpy(arr(d, "x.f32", np.float32).astype(np.float64)).to(dev)
    y = torch.from_numpy(arr(d, "y.f32", np.float32).astype(np.float64)).to(dev).reshape(slots, n)
    ids = arr(d, "ids.u32", np.uint32)
    refs, scales = [], []
    for s in range(slots):
        ex = int(ids[s]) if m["kind"] == "gather" else 0
        q = torch.from_numpy(codes(np.ascontiguousarray(words[ex]), n, k, bits)).to(dev).double()
        S = torch.from_numpy(sc[ex].astype(np.float64)).to(dev).repeat_interleave(gs, dim=1)
        B = torch.from_numpy(bi[ex].astype(np.float64)).to(dev).repeat_interleave(gs, dim=1)
        w = S * q + B
        xs = x[s * k:(s + 1) * k] if m["x_per_slot"] else x[:k]
        refs.append(w @ xs)
        scales.append((w * xs).abs().sum(dim=1))
    return compare(y.reshape(-1), torch.cat(refs), torch.cat(scales), m["dtype"])


def check_attn(d, m):
    nh, nk, hd, ml, ln, dt = m["n_heads"], m["n_kv"], m["hd"], m["max_len"], m["len"], m["dtype"]
    q = torch.from_numpy(arr(d, "q.f32", np.float32)).to(dev).reshape(nh, hd)
    K = torch.from_numpy(arr(d, "k.f32", np.float32)).to(dev).reshape(nk, ml, hd)[:, :ln].double()
    V = torch.from_numpy(arr(d, "v.f32", np.float32)).to(dev).reshape(nk, ml, hd)[:, :ln].double()
    out = torch.from_numpy(arr(d, "out.f32", np.float32).astype(np.float64)).to(dev).reshape(nh, hd)
    t = TDT[dt]
    qs = (q.to(t) * torch.tensor(m["scale"], dtype=torch.float32).to(t)).double()  # MLX: q * array(scale, dtype)
    g = nh // nk
    Kq = K.repeat_interleave(g, dim=0)
    Vq = V.repeat_interleave(g, dim=0)
    p = torch.softmax(torch.einsum("hd,htd->ht", qs, Kq), dim=-1)
    ref = torch.einsum("ht,htd->hd", p, Vq)
    scale = torch.einsum("ht,htd->hd", p, Vq.abs())
    return compare(out.reshape(-1), ref.reshape(-1), scale.reshape(-1), dt)


def main():
    root = sys.argv[1]
    fails = 0
    cases = sorted(os.listdir(root))
    print(f"torch {torch.__version__} on {dev}: {len(cases)} cases")
    for c in cases:
        d = os.path.join(root, c)
        m = json.load(open(os.path.join(d, "meta.json")))
        worst, rel, bad = check_attn(d, m) if m["kind"] == "attention" else check_q(d, m)
        ok = bad == 0 and worst <= 1.0 and rel <= NORM[m["dtype"]]
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'} {c:<48} worst/tol={worst:7.3f} rel_norm={rel:.2e} unwritten={bad}")
    print(f"torch cross-check: {len(cases)} cases, {fails} failed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
