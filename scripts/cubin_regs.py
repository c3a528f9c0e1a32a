#!/usr/bin/env python3
"""Registers per thread of the kernels in a cubin (NVRTC's output in the kernel cache), read
from the global .nv.info section (EIATTR_REGCOUNT entries: symbol index, count), so a register
budget can be checked here, without the GPU. Usage: cubin_regs.py CUBIN [SUBSTRING]"""
import struct, sys

data = open(sys.argv[1], "rb").read()
want = sys.argv[2] if len(sys.argv) > 2 else ""
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
hdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
def cstr(off):
    return data[off:data.index(b"\0", off)].decode()
names = [cstr(hdrs[shstrndx][4] + h[0]) for h in hdrs]
sec = {n: h for n, h in zip(names, hdrs)}
symtab, strtab = sec[".symtab"], sec[".strtab"]
def sym_name(i):
    st_name, = struct.unpack_from("<I", data, symtab[4] + 24 * i)
    return cstr(strtab[4] + st_name)
info = sec[".nv.info"]
blob = data[info[4]:info[4] + info[5]]
i = 0
while i + 4 <= len(blob):
    fmt, attr, size = blob[i], blob[i + 1], struct.unpack_from("<H", blob, i + 2)[0]
    if fmt == 0x04:  # EIFMT_SVAL: `size` bytes follow
        if attr == 0x2F:  # EIATTR_REGCOUNT
            sym, regs = struct.unpack_from("<II", blob, i + 4)
            if want in sym_name(sym):
                print(f"{sym_name(sym):60s} regs {regs}")
        i += 4 + size
    else:
        i += 4
