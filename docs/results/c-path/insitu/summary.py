"""Per-call thread CPU of each side of an in-situ A/B (sitecustomize.py's JSON lines).
usage: summary.py FILE"""
import json
import sys

total: dict = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    for name, impls in d["what"].items():
        for impl, (n, s) in impls.items():
            t = total.setdefault((d["role"], name, impl), [0, 0.0])
            t[0] += n
            t[1] += s
for (role, name, impl), (n, s) in sorted(total.items()):
    print(f"{role:12s} {name:12s} {impl:10s} {n:7d} calls {1e6 * s / n:8.1f} us/call")
