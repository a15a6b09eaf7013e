"""`halo eval …`: accuracy measurements that print (and with --json emit) their numbers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from halollm.cli.options import add_model_options
from halollm.cli.progress import Bars
from halollm.errors import HaloError
from halollm.model.loader import content_hash, open_source, open_tokenizer
from halollm.predictor import report, store
from halollm.predictor.calibrate import read_texts
from halollm.predictor.signals import GroupedModel, chunked


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate accuracy (predictor quality, …)",
                       description="Accuracy evaluations. Each prints a table; --json prints "
                                   "one JSON object.")
    esub = p.add_subparsers(dest="eval", metavar="EVAL", required=True)
    q = esub.add_parser(
        "predictor", help="quality of a predictor on a held-out text",
        description="Rank quality (recall of the truly most significant groups, Spearman) and "
                    "the end-to-end cost of dropping the lowest-ranked groups of every layer, "
                    "per token, for the predictor, the oracle (true per-token significance), "
                    "the static calibrated ranking and random choice: KL to the full model, "
                    "top-1 agreement, perplexity.")
    add_model_options(q)
    q.add_argument("--predictor", metavar="PATH",
                   help="predictor file (default: the one `halo calibrate` saved for the model)")
    q.add_argument("--text", required=True, metavar="FILE",
                   help="held-out text (not the calibration text), UTF-8")
    q.add_argument("--tokens", type=int, default=1024, metavar="N",
                   help="evaluate the first N tokens of the text (default: 1024)")
    q.add_argument("--context", type=int, default=256, metavar="N",
                   help="tokens per sequence (default: 256)")
    q.add_argument("--fractions", default="0.05,0.1,0.2,0.3", metavar="F,…",
                   help="fractions of groups dropped per layer half (default: 0.05,0.1,0.2,0.3)")
    q.add_argument("--kinds", default="mlp", choices=["mlp", "attn", "attn,mlp"],
                   help="which halves lose groups (default: mlp)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_predictor)


def parse_fractions(text: str) -> list[float]:
    try:
        out = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise HaloError(f"--fractions must be numbers separated by commas (got {text!r})"
                        ) from None
    if not out or any(not 0 <= f < 1 for f in out):
        raise HaloError("--fractions must be between 0 (inclusive) and 1 (exclusive)")
    return out


def run_predictor(args: argparse.Namespace) -> int:
    fractions = parse_fractions(args.fractions)
    ((_, text),) = read_texts([args.text])
    source = open_source(args.model)
    bars = Bars(enabled=not args.json)
    try:
        model_hash = content_hash(Path(source.path))
        predictor = store.load_for(Path(source.path), model_hash, args.predictor)
        path = predictor.path
        ids = open_tokenizer(source).encode(text)[:args.tokens]
        chunks = chunked(ids, args.context)
        if not chunks:
            raise HaloError(f"{args.text} has too few tokens to evaluate")
        gm = GroupedModel(source.config, source.tensor, predictor.partition)
        kinds = args.kinds.split(",")
        step = bars("evaluating", len(fractions) * len(report.METHODS))
        rep = report.quality(gm, predictor, chunks, fractions, kinds,  # type: ignore[arg-type]
                             progress=lambda: step(1))
    finally:
        bars.close()
        source.close()
    rep["predictor"] = str(path)
    rep["partition"] = store.describe(predictor.partition)
    if args.json:
        print(json.dumps(rep))
    else:
        print(f"predictor {path} ({rep['partition']})")
        print(report.format_report(rep))
    return 0
