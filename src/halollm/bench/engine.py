"""`halo bench engine`: single-device decode ms/token and prefill tokens/s per dtype, and each
dtype's agreement with fp32 (which picks the default dtype)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from halollm.bench.report import publish
from halollm.generate import LocalDecoder, generate, teacher_forced
from halollm.model.loader import DTYPES, load_model
from halollm.sampling import SamplingParams

# A fixed English check text (written for this project), ~250 tokens.
CHECK_TEXT = (
    "The lighthouse keeper rose before dawn, as he had every morning for thirty years. He "
    "climbed the spiral stairs, counting the one hundred and twelve steps out of habit, and "
    "checked the lamp, the lens and the clockwork that turned them. Outside, the sea was grey "
    "and restless; a fishing boat was making for the harbour ahead of the weather. He wrote in "
    "the log: wind from the south-west, rising; visibility four miles; barometer falling. Then "
    "he made tea, sat by the window and watched the boat until it was safe behind the "
    "breakwater. In the afternoon the storm arrived. Rain drummed on the glass, the tower hummed "
    "in the gusts, and the beam swept across the water every ten seconds, steady and bright. "
    "Late that night a second boat appeared, far out, its lights rising and falling with the "
    "swell. The keeper watched it for an hour, ready to call the lifeboat station, but the "
    "skipper knew these waters: he kept the light on his starboard bow, rounded the point in "
    "the lee of the cliffs and slipped into the bay. At four in the morning the wind dropped. "
    "The keeper wrote the last entry of his shift, wound the clockwork once more and went down "
    "the stairs to sleep."
)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="single-device speed and accuracy per dtype",
                       description=__doc__)
    p.add_argument("--model", metavar="PATH", help="model (default: the default model)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated (default: all)")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens to decode (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per dtype (default 3)")
    p.add_argument("--out", type=Path, default=Path("docs/results"),
                   help="output folder (default: docs/results)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def teacher_forced_top1(model: Any, ids: list[int]) -> torch.Tensor:
    """Top-1 prediction at every position, computed one token at a time (the decode path)."""
    return teacher_forced(LocalDecoder(model.transformer), ids).argmax(-1)


def run(args: argparse.Namespace) -> int:
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if "fp32" not in dtypes:
        dtypes.insert(0, "fp32")  # the reference for agreement
    rows: dict[str, dict[str, Any]] = {}
    ref: tuple[torch.Tensor, list[int]] | None = None  # fp32's top-1 and greedy tokens
    for name in dtypes:
        print(f"[{name}] loading…", file=sys.stderr, flush=True)
        model = load_model(args.model, name)
        check_ids = model.tokenizer.encode(CHECK_TEXT)
        decode, prefill, out_ids = _timed(args, name, model, check_ids)
        top1 = teacher_forced_top1(model, check_ids)
        if name == "fp32":
            ref = (top1, out_ids)
        assert ref is not None
        ref_top1, ref_greedy = ref
        same_prefix = next((i for i, (a, b) in enumerate(zip(out_ids, ref_greedy, strict=False))
                            if a != b), min(len(out_ids), len(ref_greedy)))
        rows[name] = {
            "decode_ms_per_token": round(statistics.median(decode), 3),
            "decode_tokens_per_s": round(1e3 / statistics.median(decode), 1),
            "prefill_tokens_per_s": round(statistics.median(prefill), 1),
            "prefill_tokens": len(check_ids),
            "top1_agreement_vs_fp32": round(float((top1 == ref_top1).float().mean()), 4),
            "greedy_identical_tokens_vs_fp32": same_prefix,
            "greedy_tokens": len(out_ids),
        }
        del model
    ok = [d for d in rows if rows[d]["top1_agreement_vs_fp32"] >= 0.99
          and rows[d]["greedy_identical_tokens_vs_fp32"] / max(rows[d]["greedy_tokens"], 1) >= 0.99]
    fastest = min(ok, key=lambda d: rows[d]["decode_ms_per_token"])
    data = {"results": rows, "fastest_accurate_dtype": fastest,
            "decode_tokens": args.tokens, "repeats": args.repeats}
    publish(args.out, "engine", data, _lines(args, rows, fastest), args.json)
    return 0


def _timed(args: argparse.Namespace, name: str, model: Any, check_ids: list[int]
           ) -> tuple[list[float], list[float], list[int]]:
    """(decode ms/token per run, prefill tokens/s per run, the last run's greedy tokens)."""
    tok = model.tokenizer
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]))
    dec = LocalDecoder(model.transformer)
    greedy = SamplingParams(temperature=0.0)
    generate(dec, tok, prompt, max_tokens=8, sampling=greedy)  # warm-up
    decode: list[float] = []
    prefill: list[float] = []
    out_ids: list[int] = []
    for r in range(args.repeats):
        res = generate(dec, tok, prompt, max_tokens=args.tokens, sampling=greedy,
                       ignore_eos=True)
        decode.append(statistics.median(res.step_s) * 1e3)
        out_ids = res.token_ids
        t = time.perf_counter()
        model.transformer.forward(check_ids, 0, last_only=True)
        prefill.append(len(check_ids) / (time.perf_counter() - t))
        print(f"[{name}] run {r + 1}/{args.repeats}: decode {decode[-1]:.2f} ms/token, "
              f"prefill {prefill[-1]:.0f} tokens/s", file=sys.stderr, flush=True)
    return decode, prefill, out_ids


def _lines(args: argparse.Namespace, rows: dict[str, dict[str, Any]], fastest: str
           ) -> list[str]:
    lines = ["# Single-device engine: speed and accuracy per dtype", "", "{header}",
             "Decode: median ms/token over the timed runs (each the median step of "
             f"{args.tokens} greedy tokens after a chat prompt). Prefill: one forward pass over "
             "the check text. Agreement: teacher-forced top-1 on the check text vs fp32, "
             "decoded one token at a time (the decode path); greedy: "
             "how many of the generated tokens equal fp32's before the first difference.", "",
             "| dtype | decode ms/token | tokens/s | prefill tokens/s | top-1 vs fp32 | greedy "
             "= fp32 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for d, r in rows.items():
        lines.append(f"| {d} | {r['decode_ms_per_token']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.0f} | {100 * r['top1_agreement_vs_fp32']:.1f}%"
                     f" | {r['greedy_identical_tokens_vs_fp32']}/{r['greedy_tokens']} |")
    lines += ["", f"Fastest dtype with >= 99% agreement: **{fastest}**.", "",
              "For scale, llama.cpp decodes this model at about 6 ms/token on this kind of "
              "machine (reading the Q4_1 weights directly, ~75 MB/token). Decode here is bound "
              "by PyTorch's GEMV bandwidth on dequantized weights: the fp16 projections alone "
              "stream 270 MB/token (~12 ms/token measured on their own); fp32 streams twice "
              "that. See docs/engine.md for what was tried and the next step (int4 kernels).",
              ""]
    return lines
