"""`halo bench loader`: decode speed under a memory budget, per loading policy.

For each budget (a share of the model's group weights, in the default weight format: packed
for a quantized model) and policy, one process
decodes the same greedy tokens with the group weights streamed from the memory-mapped model
file: HALO's `prefetch` (farthest-future eviction, background loading), `demand` (the same
cache, loading only when needed) and `window` (TPI-LLM's sliding window). The baselines are
the ordinary fully resident model (`resident`: fused matrices) and the streamed decoder
with a 100% budget (same per-group computation, nothing to load after the first token).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from halollm.bench.report import publish, stage_printer
from halollm.errors import HaloError
from halollm.generate import LocalDecoder, generate
from halollm.loader.store import POLICIES
from halollm.loader.streamed import StreamedDecoder, rss_anon_bytes
from halollm.model.loader import (
    ModelSource,
    load_model,
    open_source,
    open_tokenizer,
    resolve_format,
)
from halollm.sampling import SamplingParams

PROMPT = "The history of the printing press begins"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loader", help="decode speed under a memory budget, per policy",
                       description=__doc__)
    p.add_argument("--model", metavar="PATH", help="model (default: the default model)")
    p.add_argument("--budgets", default="100,50,25", metavar="P,…",
                   help="budgets in percent of the model's group weights (default 100,50,25)")
    p.add_argument("--policies", default=",".join(POLICIES), metavar="NAME,…")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per run (16)")
    p.add_argument("--threads", type=int, default=1, help="torch compute threads (1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of every configuration in turn; medians over them (3)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--name", default="loader", help="results file name (default loader)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if any(p not in POLICIES for p in policies) or not policies:
        raise HaloError(f"--policies takes some of {', '.join(POLICIES)}")
    if any(not 0 < b <= 100 for b in budgets) or args.tokens < 2 or args.rounds < 1:
        raise HaloError("--budgets are percentages in (0, 100]; --tokens at least 2; "
                        "--rounds at least 1")
    torch.set_num_threads(args.threads)

    say = stage_printer("loader")
    rounds = [_round(args, budgets, policies, say, r) for r in range(args.rounds)]
    _write(args, _merge(rounds))
    return 0


def _round(args: argparse.Namespace, budgets: list[float], policies: list[str],
           say: Any, r: int) -> list[dict[str, Any]]:
    """One round: the resident run, then every streamed configuration, one after another
    (rounds interleave the configurations, so a change of the shared machine's load shows
    in every configuration of a round rather than in one)."""
    rows: list[dict[str, Any]] = []
    say(f"round {r + 1}/{args.rounds}: resident, the whole model in memory (fused matrices)…")
    model = load_model(args.model, None)
    tok = model.tokenizer
    ids = tok.encode(PROMPT)
    res = generate(LocalDecoder(model.transformer), tok, ids, max_tokens=args.tokens,
                   sampling=SamplingParams(), ignore_eos=True)
    rows.append({"config": "resident", "budget": 100.0, "policy": "-",
                 "decode_ms_per_token": round(statistics.median(1e3 * s for s in res.step_s),
                                              2)})
    reference = res.token_ids
    del model
    source = open_source(args.model)
    try:
        for budget in budgets:
            for policy in policies:
                if budget == 100 and policy != policies[0]:
                    continue  # nothing to load after the first token: policies agree
                say(f"budget {budget:g}%, {policy}…")
                rows.append(_streamed(source, ids, budget, policy, args.tokens, reference))
                say(f"    {rows[-1]['decode_ms_per_token']} ms/token, "
                    f"{rows[-1]['mib_read_per_token']} MiB read per token")
    finally:
        source.close()
    return rows


def _merge(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per configuration: the median ms/token over the rounds, the median of each round's
    ratio to that round's resident and streamed-100% runs, every round's ms/token; the other
    fields from the last round (same tokens: in every round)."""
    rows = []
    full100 = [next((r["decode_ms_per_token"] for r in rs if r["config"] == "streamed"
                     and r["budget"] == 100), None) for rs in rounds]
    for i, last in enumerate(rounds[-1]):
        ms = [rs[i]["decode_ms_per_token"] for rs in rounds]
        row = {**last, "decode_ms_per_token": round(statistics.median(ms), 2),
               "rounds_ms_per_token": ms,
               "vs_resident": round(statistics.median(
                   m / rs[0]["decode_ms_per_token"] for m, rs in zip(ms, rounds, strict=True)), 3)}
        if all(f is not None for f in full100):
            row["vs_streamed_100"] = round(statistics.median(
                m / f for m, f in zip(ms, full100, strict=True)), 3)  # type: ignore[operator]
        if "same_tokens_as_resident" in last:
            row["same_tokens_as_resident"] = all(rs[i]["same_tokens_as_resident"]
                                                 for rs in rounds)
        rows.append(row)
    return rows


def _streamed(source: ModelSource, ids: list[int], budget: float, policy: str, tokens: int,
              reference: list[int]) -> dict[str, Any]:
    """Greedy decoding with the groups streamed under a budget (% of the model's groups)."""
    dec = StreamedDecoder(source, resolve_format(source), f"{budget}%", policy)
    try:
        r = generate(dec, open_tokenizer(source), ids, max_tokens=tokens,
                     sampling=SamplingParams(), ignore_eos=True)
        stats = dec.loader_json()
        anon = rss_anon_bytes()
    finally:
        dec.close()
    steady = stats["per_token"][2:]  # after the prompt and first token
    return {
        "config": "streamed", "budget": budget, "policy": policy,
        "decode_ms_per_token": round(statistics.median(1e3 * s for s in r.step_s), 2),
        "same_tokens_as_resident": r.token_ids == reference,
        "mib_read_per_token": round(statistics.mean(
            t["bytes_loaded"] for t in steady) / 2**20, 2) if steady else None,
        "stall_ms_per_token": round(statistics.mean(
            t["stall_ms"] for t in steady), 2) if steady else None,
        "hit_rate": round(stats["hits"] / max(1, stats["hits"] + stats["misses"]), 3),
        "hidden_share": stats["hidden_share"],
        "budget_mib": round(stats["budget_bytes"] / 2**20, 1),
        "model_group_mib": round(stats["model_group_bytes"] / 2**20, 1),
        "peak_resident_mib": round(stats["peak_resident_bytes"] / 2**20, 1),
        "rss_anon_mib": round(anon / 2**20, 1)}


def _write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    lines = ["# Decoding under a memory budget", "", "{header}",
             f"Model: `{args.model or 'default (SmolLM2-135M-Instruct, Q4_1 GGUF)'}`, "
             f"default weight format, {args.tokens} greedy tokens, median per-token decode time, "
             f"{args.threads} compute thread(s); the loader thread runs beside it. The budget "
             "counts group weights in that format (attention and MLP of every layer); the "
             "embedding, output head, norms and KV caches are resident overhead. "
             f"{args.rounds} round(s) of every configuration in turn: ms/token is the median "
             "over the rounds, a ratio the median of the rounds' ratios (each against the "
             "same round's run).", "",
             "| budget | policy | ms/token | vs resident | vs streamed 100% | MiB read/token | "
             "stall ms/token | hit rate | share of loading hidden | same tokens | "
             "ms/token per round |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
             f"| 100% | resident (fused) | {rows[0]['decode_ms_per_token']} | 1.00x | | | | | "
             f"| | {', '.join(map(str, rows[0]['rounds_ms_per_token']))} |"]
    for r in rows[1:]:
        vs = f"{r['vs_streamed_100']:.2f}x" if "vs_streamed_100" in r else ""
        lines.append(f"| {r['budget']:g}% | {r['policy']} | {r['decode_ms_per_token']} | "
                     f"{r['vs_resident']:.2f}x | {vs} | "
                     f"{r['mib_read_per_token']} | {r['stall_ms_per_token']} | "
                     f"{r['hit_rate']:.0%} | {r['hidden_share']:.0%} | "
                     f"{'yes' if r['same_tokens_as_resident'] else 'no'} | "
                     f"{', '.join(map(str, r['rounds_ms_per_token']))} |")
    lines.append("")
    publish(args.out, args.name, {"model": args.model or "default", "rounds": args.rounds,
                                  "rows": rows}, lines, args.json)
