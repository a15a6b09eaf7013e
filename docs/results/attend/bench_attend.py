"""One decode position's attention kernel (`_kernels.attend`), two builds side by side.

usage: bench_attend.py OLD_SO NEW_SO   (each a built _kernels .so, copied outside the tree)
Prints, per shape and context length, the median µs per call of each build over interleaved
repeats (one thread), and the largest difference between their outputs relative to the output's
largest value."""
import importlib.machinery
import importlib.util
import statistics
import sys
import time

import torch

torch.set_num_threads(1)


def load(path: str, name: str):
    loader = importlib.machinery.ExtensionFileLoader("halollm.model._kernels", path)
    spec = importlib.util.spec_from_file_location("halollm.model._kernels", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


old = load(sys.argv[1], "old")
new = load(sys.argv[2], "new")

SHAPES = {"m1024 layer (16 q, 8 kv)": (16, 8), "one worker's share (2 q, 1 kv)": (2, 1),
          "SmolLM2-135M layer (9 q, 3 kv)": (9, 3)}
HD = 64
gen = torch.Generator().manual_seed(0)
print(f"{'shape':34} {'context':>7} {'old us':>8} {'new us':>8} {'ratio':>6} {'max rel diff':>12}")
for label, (nq, nkv) in SHAPES.items():
    for ctx in (64, 256, 1024):
        cap = ctx + 8
        k = torch.randn(nkv, cap, HD, generator=gen)
        v = torch.randn(nkv, cap, HD, generator=gen)
        qkv = torch.randn(1, (nq + 2 * nkv) * HD, generator=gen)
        cos, sin = torch.randn(HD, generator=gen), torch.randn(HD, generator=gen)
        outs = {}
        times: dict[str, list[float]] = {"old": [], "new": []}
        calls = max(20, 20000 // ctx)
        for rep in range(7):
            sides = (("old", old), ("new", new))
            for name, mod in sides if rep % 2 else sides[::-1]:
                out = torch.empty(1, nq * HD)
                kk, vv = k.clone(), v.clone()
                t0 = time.perf_counter()
                for _ in range(calls):
                    mod.attend(out.data_ptr(), qkv.data_ptr(), nq, nkv, HD, ctx - 1,
                               cos.data_ptr(), sin.data_ptr(), kk.data_ptr(), vv.data_ptr(), cap)
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
                outs[name] = out
        o, n = statistics.median(times["old"]), statistics.median(times["new"])
        diff = float((outs["new"] - outs["old"]).abs().max() / outs["old"].abs().max())
        print(f"{label:34} {ctx:7d} {o:8.1f} {n:8.1f} {o / n:6.2f} {diff:12.2e}")
