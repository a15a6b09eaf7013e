"""Ratios new/base of each interleaved pair of ab_cpu.py lines (base first), and medians.
usage: pairs.py FILE"""
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
pairs = list(zip(rows[0::2], rows[1::2], strict=True))
for key in ("ms_per_token", "coord_cpu_ms_per_token", "worker_cpu_ms_per_token"):
    base = [a[key] for a, _ in pairs]
    new = [b[key] for _, b in pairs]
    ratios = [b / a for a, b in zip(base, new, strict=True)]
    print(f"{key:24s} base {base} new {new} ratios {[round(r, 2) for r in ratios]} "
          f"median {statistics.median(ratios):.2f}")
