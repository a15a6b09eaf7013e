"""`halo bench engine`: single-device decode ms/token, prefill tokens/s, resident weight bytes
and peak RSS per weight format (float dtypes, packed quantized weights), and each format's
agreement with fp32. Timed runs are `halo generate --json` processes, the formats interleaved
(round-robin), so that a busy machine slows them alike and each run's peak RSS is its own."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from halollm.bench.report import publish
from halollm.errors import HaloError
from halollm.generate import LocalDecoder, teacher_forced
from halollm.model.loader import load_model

# A format: fp32 / fp16 / bf16 (dequantized weights, --dtype), packed (the default: a
# quantized model's own types packed), q4 / q8 (--quant: every matrix packed).
FORMATS = ("fp32", "fp16", "bf16", "packed", "q4", "q8")
DEFAULT_FORMATS = "fp32,fp16,bf16,packed"

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
    p = sub.add_parser("engine", help="single-device speed, memory and accuracy per format",
                       description=__doc__)
    p.add_argument("--model", metavar="PATH", help="model (default: the default model)")
    p.add_argument("--formats", "--dtypes", dest="formats", default=DEFAULT_FORMATS,
                   help=f"comma-separated, of {', '.join(FORMATS)} (default: "
                        f"{DEFAULT_FORMATS})")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens to decode (default 64)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per format, interleaved (default 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="compute threads of each timed run (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--no-accuracy", action="store_true",
                   help="skip the agreement with fp32 (random-weight models: meaningless)")
    p.add_argument("--out", type=Path, default=Path("docs/results"),
                   help="output folder (default: docs/results)")
    p.add_argument("--name", default="engine", help="result file name (default: engine)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def teacher_forced_top1(model: Any, ids: list[int]) -> torch.Tensor:
    """Top-1 prediction at every position, computed one token at a time (the decode path)."""
    return teacher_forced(LocalDecoder(model.transformer), ids).argmax(-1)


def format_args(name: str) -> tuple[list[str], str | None, str | None]:
    """(halo generate flags, load_model dtype, load_model quant) of a format."""
    if name in ("fp32", "fp16", "bf16"):
        return ["--dtype", name], name, None
    if name == "packed":
        return [], None, None
    if name in ("q4", "q8"):
        return ["--quant", name], None, name
    raise HaloError(f"unknown format '{name}' (choose from {', '.join(FORMATS)})")


def run(args: argparse.Namespace) -> int:
    names = [d.strip() for d in args.formats.split(",") if d.strip()]
    for name in names:
        format_args(name)
    if not args.no_accuracy and "fp32" not in names:
        names.insert(0, "fp32")  # the reference for agreement
    load_before = os.getloadavg()
    runs = _timed_runs(args, names)
    load_after = os.getloadavg()
    rows = {name: _summary(runs[name]) for name in names}
    if not args.no_accuracy:
        _accuracy(args, names, rows, runs)
    ok = [d for d in rows if rows[d].get("top1_agreement_vs_fp32", 0) >= 0.99
          and rows[d].get("greedy_identical_tokens_vs_fp32", 0) / max(
              rows[d]["greedy_tokens"], 1) >= 0.99]
    fastest = min(ok, key=lambda d: rows[d]["decode_ms_per_token"]) if ok else None
    data = {"model": args.model or "default", "results": rows,
            "fastest_accurate_format": fastest, "decode_tokens": args.tokens,
            "repeats": args.repeats, "threads": args.threads,
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in load_after]}}
    publish(args.out, args.name, data, _lines(args, rows, fastest, data["load_average"]),
            args.json)
    return 0


def _timed_runs(args: argparse.Namespace, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """`halo generate --json` once per format per round, the formats interleaved."""
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    model = ["--model", args.model] if args.model else []
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            cmd = [sys.executable, "-m", "halollm.cli.main", "generate", *model,
                   *format_args(name)[0], "--chat", PROMPT, "--max-tokens", str(args.tokens),
                   "--ignore-eos", "--json"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise HaloError(f"{name}: halo generate failed: {proc.stderr.strip()[-500:]}")
            out = json.loads(proc.stdout)
            runs[name].append(out)
            print(f"[{name}] run {r + 1}/{args.repeats}: decode "
                  f"{out['decode_ms_median_per_token']:.2f} ms/token, weights "
                  f"{out['weight_bytes'] / 2**20:.0f} MiB, peak RSS "
                  f"{out['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return runs


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    decode = statistics.median(r["decode_ms_median_per_token"] for r in runs)
    return {"weights": runs[0]["weights"], "dtype": runs[0]["dtype"],
            "decode_ms_per_token": round(decode, 3),
            "decode_ms_per_token_runs": [r["decode_ms_median_per_token"] for r in runs],
            "decode_tokens_per_s": round(1e3 / decode, 1),
            "prefill_tokens_per_s": round(statistics.median(
                r["prefill_tokens_per_s"] for r in runs), 1),
            "weight_bytes": runs[0]["weight_bytes"],
            "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in runs)),
            "greedy_tokens": len(runs[-1]["token_ids"])}


def _accuracy(args: argparse.Namespace, names: list[str], rows: dict[str, dict[str, Any]],
              runs: dict[str, list[dict[str, Any]]]) -> None:
    """Teacher-forced top-1 on the check text vs fp32 (in this process, one format at a
    time) and how many greedy tokens of the timed runs equal fp32's."""
    ref_top1: torch.Tensor | None = None
    ref_greedy = runs["fp32"][-1]["token_ids"]
    for name in names:
        _, dtype, quant = format_args(name)
        print(f"[{name}] agreement with fp32…", file=sys.stderr, flush=True)
        model = load_model(args.model, dtype, quant=quant)
        check_ids = model.tokenizer.encode(CHECK_TEXT)
        top1 = teacher_forced_top1(model, check_ids)
        del model
        if ref_top1 is None:
            ref_top1 = top1
        out_ids = runs[name][-1]["token_ids"]
        same = next((i for i, (a, b) in enumerate(zip(out_ids, ref_greedy, strict=False))
                     if a != b), min(len(out_ids), len(ref_greedy)))
        rows[name]["prefill_tokens"] = len(check_ids)
        rows[name]["top1_agreement_vs_fp32"] = round(float((top1 == ref_top1).float().mean()), 4)
        rows[name]["greedy_identical_tokens_vs_fp32"] = same


def _lines(args: argparse.Namespace, rows: dict[str, dict[str, Any]], fastest: str | None,
           load: dict[str, list[float]]) -> list[str]:
    lines = ["# Single-device engine: speed, memory and accuracy per weight format", "",
             "{header}",
             f"Model: `{args.model or 'default (SmolLM2-135M-Instruct, Q4_1 GGUF)'}`. Each "
             f"format was timed by {args.repeats} `halo generate --json` processes, the formats "
             f"interleaved (threads: {args.threads or 'torch default'}); decode: the median "
             f"over runs of each run's median step of {args.tokens} greedy tokens after a chat "
             "prompt; prefill: that prompt. Weights: resident weight bytes (`weight_bytes`); "
             "peak RSS: the process's (`peak_rss_bytes`, VmHWM). Agreement: teacher-forced "
             "top-1 on the check text vs fp32, decoded one token at a time (the decode path); "
             "greedy: how many generated tokens equal fp32's before the first difference. "
             f"Load average (1/5/15 min) before {load['before']}, after {load['after']}.", "",
             "| format | weights | decode ms/token | tokens/s | prefill tokens/s | weight MiB "
             "| peak RSS MiB | top-1 vs fp32 | greedy = fp32 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for d, r in rows.items():
        top1 = r.get("top1_agreement_vs_fp32")
        greedy = r.get("greedy_identical_tokens_vs_fp32")
        agree = "-" if top1 is None else f"{100 * top1:.1f}%"
        same = "-" if greedy is None else f"{greedy}/{r['greedy_tokens']}"
        lines.append(
            f"| {d} | {r['weights']} | {r['decode_ms_per_token']:.2f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['weight_bytes'] / 2**20:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
            f"{agree} | {same} |")
    if fastest is not None:
        lines += ["", f"Fastest format with >= 99% agreement: **{fastest}**."]
    lines += ["", "Formats: fp32/fp16/bf16 dequantize every weight (`--dtype`); packed keeps a "
              "GGUF's quantized types packed (the default; docs/quant.md); q4/q8 pack every "
              "matrix (`--quant`).", ""]
    return lines
