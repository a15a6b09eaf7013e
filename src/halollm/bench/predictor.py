"""`halo bench predictor`: the predictor's quality report on a held-out text for one or more
predictor files side by side (e.g. contribution-ordered vs contiguous groups), and its cost:
the time of one layer half's prediction against single-device decode time."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from halollm.bench.report import publish
from halollm.generate import LocalDecoder, teacher_forced
from halollm.model.loader import content_hash, load_model, open_source, open_tokenizer
from halollm.predictor import report, store
from halollm.predictor.calibrate import read_texts
from halollm.predictor.critical import SharePredictor, critical_devices
from halollm.predictor.signals import GroupedModel, chunked


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predictor", help="predictor quality and cost", description=__doc__)
    p.add_argument("--text", required=True, metavar="FILE", help="held-out text, UTF-8")
    p.add_argument("--predictor", nargs="+", metavar="PATH",
                   help="predictor files (default: the one `halo calibrate` saved)")
    p.add_argument("--tokens", type=int, default=1024, help="held-out tokens (default 1024)")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def prediction_cost_us(pred: store.Predictor, repeats: int = 3000) -> float:
    """Microseconds per layer half for one token: shares + the critical devices."""
    torch.set_num_threads(1)
    sp = SharePredictor(pred.nets["mlp"])
    groups = pred.nets["mlp"].groups
    owner = torch.arange(groups).remainder(5).numpy()
    x = torch.randn(1, pred.nets["mlp"].w1.shape[-1]).half()
    n_layers = len(pred.partition.layers)
    t0 = time.perf_counter()
    for i in range(repeats):
        critical_devices(sp.shares(i % n_layers, x), 0.98, owner)
    return 1e6 * (time.perf_counter() - t0) / repeats


def decode_ms(ids: list[int]) -> float:
    """Median single-device decode step (default dtype, 1 thread) over the given tokens."""
    torch.set_num_threads(1)
    m = load_model(None, None)
    steps: list[float] = []
    teacher_forced(LocalDecoder(m.transformer), ids, steps)
    return statistics.median(steps[1:]) * 1e3


def run(args: argparse.Namespace) -> int:
    ((text_name, text),) = read_texts([args.text])
    source = open_source(None)
    model_hash = content_hash(Path(source.path))  # once: it reads the whole file
    preds = [store.load_for(Path(source.path), model_hash, p)
             for p in (args.predictor or [None])]
    paths = [p.path for p in preds]
    ids = open_tokenizer(source).encode(text)[:args.tokens]
    chunks = chunked(ids, args.context)
    results: list[dict[str, Any]] = []
    for k, (pred, path) in enumerate(zip(preds, paths, strict=True), start=1):
        print(f"[bench predictor] {k}/{len(preds)}: {path}", file=sys.stderr, flush=True)
        gm = GroupedModel(source.config, source.tensor, pred.partition)
        rep = report.quality(gm, pred, chunks)
        rep.update(predictor=str(path), grouping=pred.meta.get("grouping"),
                   partition=store.describe(pred.partition),
                   training_tokens=pred.meta.get("training_tokens"))
        results.append(rep)
    cost_us = prediction_cost_us(preds[0])
    ms = decode_ms(ids[:64])
    n_layers = source.config.n_layers
    cost = {"us_per_layer_half": round(cost_us, 1), "layers": n_layers,
            "ms_per_token": round(cost_us * n_layers / 1e3, 3),
            "single_device_decode_ms": round(ms, 2),
            "share_of_decode": round(cost_us * n_layers / 1e3 / ms, 4)}
    lines = ["# The semantic-aware predictor: quality and cost", "", "{header}",
             f"Held-out text: `{Path(text_name).name}`, first {len(ids)} tokens in sequences of "
             f"{args.context}. Per token and layer, the lowest-ranked MLP groups are zeroed; KL "
             "to the full model / top-1 agreement / perplexity, for the predictor, the oracle "
             "(true per-token significance), the static calibrated ranking and random choice. "
             "`gap closed`: share of the static-to-oracle KL gap the predictor closes.", ""]
    for rep in results:
        lines += [f"## {rep['grouping']} groups ({rep['partition']}; trained on "
                  f"{rep['training_tokens']} tokens)", "", "```",
                  report.format_report(rep), "```", ""]
    lines += ["## Cost", "",
              f"One layer half's prediction for one token (shares + critical devices, numpy, 1 "
              f"thread): {cost['us_per_layer_half']} µs; x {n_layers} layers = "
              f"{cost['ms_per_token']} ms/token against {cost['single_device_decode_ms']} "
              f"ms/token single-device fp16 decode = **{cost['share_of_decode']:.1%}** of decode "
              "time, if it ran every round. At run time it runs only for rounds with a "
              "contribution still missing at the deadline.", ""]
    publish(args.out, "predictor", {"results": results, "cost": cost}, lines, args.json)
    return 0
