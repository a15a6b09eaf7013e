"""Measurements behind docs/quant.md: kernel speed, per-type packing error, and the default
model run on packed weights.

    python -m halollm.model.quant_bench micro   # ms per matvec, 1 thread, median of 7
    python -m halollm.model.quant_bench types   # error and bytes of each GGUF type -> layout
    python -m halollm.model.quant_bench model   # agreement with fp32 and decode ms/token

`model` runs the engine with packed weights by swapping `llama.project` for `quant.linear`
inside a context manager: a measurement stand-in until the shards hold packed weights.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from halollm.model import quant as Q
from halollm.model import quant_gguf as G

SHAPES = [(2816, 1024), (1024, 2816), (49152, 1024), (576, 576), (1536, 576), (576, 1536),
          (49152, 576)]
LAYOUTS = ("int4", "int8", "int4x2")
# Offsets and kinds of the fp16 fields of each block type ('d' scale, 'm' min, 'dmin').
F16_FIELDS = {"Q4_0": [(0, "d")], "Q4_1": [(0, "d"), (2, "m")], "Q5_0": [(0, "d")],
              "Q5_1": [(0, "d"), (2, "m")], "Q8_0": [(0, "d")],
              "Q2_K": [(80, "d"), (82, "dmin")], "Q3_K": [(108, "d")],
              "Q4_K": [(0, "d"), (2, "dmin")], "Q5_K": [(0, "d"), (2, "dmin")],
              "Q6_K": [(208, "d")]}


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF rows [n, bytes] of random bits (every quant value random: catches any
    nibble/bit-order mistake) with sane fp16 scales (d in [0.002, 0.02], m = -8 d)."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (n, k // block, nbytes), dtype=np.uint8)
    for offset, kind in F16_FIELDS[qtype]:
        v = rng.uniform(0.002, 0.02, (n, k // block))
        v = (-8 * v if kind == "m" else v).astype(np.float16)
        raw[..., offset:offset + 2] = v[..., None].view(np.uint8)
    return raw.reshape(n, -1)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against b."""
    return float(((a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean()).sqrt())


def _cpu_ms(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    fn()
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        fn()
    return ((time.thread_time() - c0) / reps * 1e3, (time.perf_counter() - w0) / reps * 1e3)


def micro(shapes: list[tuple[int, int]] = SHAPES, rounds: int = 7) -> list[dict]:
    """ms per matvec (one token) for fp16 F.linear and each packed layout: medians of
    `rounds` interleaved rounds, thread CPU time and wall time."""
    torch.set_num_threads(1)
    rng, out = np.random.default_rng(0), []
    for n, k in shapes:
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        wh, xh = torch.from_numpy(w).half(), torch.randn(1, k).half()
        fns: dict[str, Callable[[], object]] = {
            "fp16": lambda wh=wh, xh=xh: torch.nn.functional.linear(xh, wh)}
        for lay in LAYOUTS:
            packed = Q.quantize(w, lay)
            fns[lay] = lambda p=packed, xh=xh: p.linear(xh)
        reps = max(3, int(2e7 // (n * k)))
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                runs[name].append(_cpu_ms(fn, reps))
        row: dict = {"shape": f"{n}x{k}"}
        for name, r in runs.items():
            row[name] = (statistics.median(c for c, _ in r), statistics.median(x for _, x in r))
        out.append(row)
        print(row["shape"], "  ".join(f"{a} {c:.3f}/{x:.3f}" for a, (c, x) in
                                      list(row.items())[1:]), flush=True)
    return out


def _realistic(qtype: str, rows: int = 1024) -> np.ndarray | None:
    """Real weights (the default model's embedding rows, Q8_0: near-continuous) quantized to
    qtype by gguf, where gguf can quantize it."""
    import gguf

    from halollm.model.loader import open_source

    if qtype not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return None
    src = open_source(None)
    try:
        w = src.tensor("embed")[:rows]
    finally:
        src.close()
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])


def types(n: int = 256, k: int = 1024) -> list[dict]:
    """For every GGUF type and layout: relative RMS weight error against gguf's dequantized
    values, on random blocks and (where gguf quantizes) on real weights; bytes vs GGUF."""
    rng, out = np.random.default_rng(0), []
    for qtype in F16_FIELDS:
        real = _realistic(qtype)
        for lay in LAYOUTS:
            row = {"type": qtype, "layout": lay, "exact": G.is_exact(qtype, lay)}
            for label, raw, kk in (("random", random_blocks(qtype, n, k, rng), k),
                                   ("real", real, 576)):
                if raw is None:
                    continue
                ref = torch.from_numpy(G.dequantize_raw(raw, qtype, kk))
                p = G.pack_raw(raw, qtype, kk, lay)
                row[label] = rel_error(p.dequantize(), ref)
                row["bytes"] = p.nbytes / raw.nbytes
            out.append(row)
            print(row, flush=True)
    return out


@contextlib.contextmanager
def packed_projections() -> Iterator[None]:
    """Let llama.project take packed weights (quant.linear) for the duration."""
    from halollm.model import llama

    original = llama.project

    def project(x: torch.Tensor, w, b=None):  # type: ignore[no-untyped-def]
        return original(x, w, b) if isinstance(w, torch.Tensor) else Q.linear(x, w, b)

    llama.project = project
    try:
        yield
    finally:
        llama.project = original


if __name__ == "__main__":
    from halollm.model.quant_bench_model import model

    {"micro": micro, "types": types, "model": model}[sys.argv[1] if len(sys.argv) > 1
                                                     else "micro"]()
