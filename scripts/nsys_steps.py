"""Summarise an nsys cuda_gpu_trace CSV of zmlx decode: per kernel name, count, median
duration and median step (end - previous kernel's end), over the last half of the trace
(decode steps in the replayed graph). Usage: nsys_steps.py TRACE.csv"""
import csv, statistics, sys

rows = []
with open(sys.argv[1]) as f:
    for r in csv.DictReader(f):
        name = r.get("Name", "")
        if not r.get("Start (ns)") or "[CUDA" in name:
            continue
        start, dur = int(r["Start (ns)"]), int(r["Duration (ns)"])
        rows.append((start, start + dur, dur, name.split("(")[0]))
rows.sort()
rows = rows[len(rows) // 2:]
steps, durs, gaps = {}, {}, []
for prev, cur in zip(rows, rows[1:]):
    steps.setdefault(cur[3], []).append(cur[1] - prev[1])
    durs.setdefault(cur[3], []).append(cur[2])
    gaps.append(cur[0] - prev[1])
span = rows[-1][1] - rows[0][0]
total = sum(sum(v) for v in steps.values())
print(f"{len(rows)} kernels over {span / 1e3:.1f} us; median start-after-prev-end {statistics.median(gaps) / 1e3:.2f} us")
print(f"{'kernel':60} {'count':>6} {'dur us':>8} {'step us':>8} {'% of chain':>10}")
for name, v in sorted(steps.items(), key=lambda kv: -sum(kv[1])):
    print(f"{name[:60]:60} {len(v):6d} {statistics.median(durs[name]) / 1e3:8.2f} "
          f"{statistics.median(v) / 1e3:8.2f} {100 * sum(v) / total:9.1f}%")
