"""`halo calibrate`: train the semantic-aware predictor on calibration text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from halollm.cli.options import add_model_options, set_threads
from halollm.cli.progress import Bars
from halollm.loader.streamed import peak_rss_bytes
from halollm.model.loader import content_hash, open_source
from halollm.predictor import report, store
from halollm.predictor.calibrate import (
    DEFAULT_TEXT,
    GROUPINGS,
    CalibrationOptions,
    calibrate,
    lean_heap,
    read_texts,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="train the predictor of significant neuron groups",
        description="Run the model over calibration text, record each layer's inputs and every "
                    "neuron group's true significance (the norm of its partial update), train "
                    "one small predictor per layer and half, report its quality on the last "
                    "tokens of the text (held out), and save it next to the model (or --out). "
                    "`halo run` and `halo demo` then use it. Without --text it trains on the "
                    "public-domain book shipped with HALO (Alice's Adventures in Wonderland). "
                    "Never calibrate on evaluation data.")
    add_model_options(p)
    p.add_argument("--text", nargs="+", metavar="FILE",
                   help="calibration text file(s), UTF-8 (default: the shipped book, "
                        f"{DEFAULT_TEXT})")
    p.add_argument("--out", type=Path, metavar="PATH",
                   help="where to save (default: next to the model, or ~/.cache/halo/predictors"
                        " if that is not writable)")
    p.add_argument("--mlp-groups", type=int, default=16, metavar="N",
                   help="MLP neuron groups per layer (default: 16)")
    p.add_argument("--attn-groups", type=int, default=1, metavar="N",
                   help="attention groups per layer, each a set of KV heads (default: 1)")
    p.add_argument("--grouping", choices=GROUPINGS, default="contribution",
                   help="contribution: MLP groups of neurons ordered by calibrated mean "
                        "contribution (hot neurons together); contiguous: equal blocks "
                        "(default: contribution)")
    p.add_argument("--max-tokens", type=int, default=16384, metavar="N",
                   help="calibration tokens used for training (default: 16384)")
    p.add_argument("--sample-tokens", type=int, metavar="N",
                   help="train on the layer inputs of N tokens drawn at random from the "
                        "--max-tokens (default: as many as 256 MiB hold, one byte per value: "
                        "14,716 for the default model); every token counts for the static "
                        "ranking")
    p.add_argument("--context", type=int, default=256, metavar="N",
                   help="tokens per calibration sequence (default: 256)")
    p.add_argument("--holdout", type=int, default=512, metavar="N",
                   help="tokens at the end of the text held out for the quality report "
                        "(default: 512; 0 skips the report)")
    p.add_argument("--rank", type=int, default=64, metavar="R",
                   help="hidden width of each predictor (default: 64)")
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="training epochs (30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch compute threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    texts = read_texts(args.text)  # before anything slow
    set_threads(args.threads)
    lean_heap()  # before the model file is parsed: peak memory
    source = open_source(args.model)
    bars = Bars(enabled=not args.json)
    try:
        opts = CalibrationOptions(
            attn_groups=args.attn_groups, mlp_groups=args.mlp_groups, grouping=args.grouping,
            max_tokens=args.max_tokens, context=args.context, holdout_tokens=args.holdout,
            rank=args.rank, epochs=args.epochs, seed=args.seed,
            sample_tokens=args.sample_tokens)
        predictor = calibrate(source, texts, opts, bar=bars)
        bars.close()
        path = args.out or store.writable_path(Path(source.path),
                                               content_hash(Path(source.path)))
        store.save(predictor, path)
    finally:
        bars.close()
        source.close()
    rep = predictor.meta.get("report")
    peak = peak_rss_bytes()
    if args.json:
        print(json.dumps({"predictor": str(path), "partition": store.describe(
            predictor.partition), **predictor.meta, "peak_rss_bytes": peak}))
        return 0
    if rep:
        print(report.format_report(rep))
    print(f"saved the predictor ({store.describe(predictor.partition)}, trained on "
          f"{predictor.meta['training_tokens']} tokens in {predictor.meta['seconds']:.0f}s, "
          f"peak memory {peak / 2**20:.0f} MiB) to {path}")
    return 0
