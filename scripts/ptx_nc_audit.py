#!/usr/bin/env python3
"""List, per kernel, the non-coherent global loads (ld.global.nc) in the PTX NVRTC makes of a
kernel module. Under programmatic dependent launch a .nc load of data an earlier kernel wrote
can return stale data even after griddepcontrol.wait (docs/kernels.md, "The PDL hazard"), so
every .nc load should read weights only. NVVM emits .nc for explicit __ldg and also for plain
loads through `const __restrict__` pointers.

Usage: python3 scripts/ptx_nc_audit.py [ops|qmv|fused] [bf16|f16|f32]
Needs libnvrtc: $ZMLX_NVRTC_LIB or the PyPI wheel in .venv-nvrtc (what .ci/run installs).
"""
import ctypes, glob, os, re, sys

kind = sys.argv[1] if len(sys.argv) > 1 else "ops"
tag = sys.argv[2] if len(sys.argv) > 2 else "bf16"
libpath = os.environ.get("ZMLX_NVRTC_LIB") or (glob.glob(".venv-nvrtc/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.*") or [None])[0]
if not libpath:
    sys.exit("ptx_nc_audit: no libnvrtc (set ZMLX_NVRTC_LIB or run .ci/run once)")
nvrtc = ctypes.CDLL(libpath)
k = "crates/zmlx-cuda/src/kernels/"
read = lambda f: open(k + f).read()
st = {"bf16": "DtBF16", "f16": "DtF16", "f32": "DtF32"}[tag]
tc = tag != "f32"
src = {
    "ops": [read("common.cuh"), read("ops.cu"), f"ZMLX_OPS({st}, {tag})"],
    "qmv": [read("common.cuh"), read("qmv.cu"), f"ZMLX_QMV_ALL({st}, {tag})"] + ([f"ZMLX_QMV_TC({st}, {tag})"] if tc else []),
    "fused": [read("common.cuh"), read("qmv.cu"), read("ops.cu"), read("fused.cu"), f"ZMLX_FUSED_ALL({st}, {tag})"] + ([f"ZMLX_FUSED_TC({st}, {tag})"] if tc else []),
}[kind]
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), "\n".join(src).encode(), kind.encode(), 0, None, None) == 0
opts = [b"--gpu-architecture=compute_90", b"--std=c++17", b"--fmad=true", b"--prec-div=true", b"--prec-sqrt=true", b"--ftz=false"]
if nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) != 0:
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    sys.exit(log.value.decode()[:4000])
n = ctypes.c_size_t()
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
nvrtc.nvrtcGetPTX(prog, ptx)
for m in re.finditer(r"\.entry (\w+)\(.*?\n\}\n", ptx.value.decode(), re.S):
    count = len(re.findall(r"ld\.global\.nc", m.group(0)))
    if count:
        print(f"{m.group(1):48s} {count} ld.global.nc")
