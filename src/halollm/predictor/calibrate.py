"""`halo calibrate` as a library call: calibration text in, a checked Predictor out."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from halollm import __version__
from halollm.errors import HaloError
from halollm.groups import KINDS, Partition
from halollm.model.loader import ModelSource, content_hash, open_tokenizer
from halollm.predictor import report, train
from halollm.predictor.partition import by_contribution
from halollm.predictor.signals import GroupedModel, chunked, collect, neuron_contributions
from halollm.predictor.store import Predictor

GROUPINGS = ("contribution", "contiguous")


@dataclass
class CalibrationOptions:
    attn_groups: int | None = 1
    mlp_groups: int = 16
    grouping: str = "contribution"
    max_tokens: int = 16384
    context: int = 256
    holdout_tokens: int = 512
    rank: int = 64
    epochs: int = 30
    seed: int = 0


Bar = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


def read_texts(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        path = Path(p)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise HaloError(f"calibration text {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise HaloError(f"cannot read calibration text {path}: {exc}") from exc
        if not text.strip():
            raise HaloError(f"calibration text {path} is empty")
        out.append((str(path), text))
    return out


def calibrate(source: ModelSource, texts: Sequence[tuple[str, str]], opts: CalibrationOptions,
              bar: Bar) -> Predictor:
    if opts.grouping not in GROUPINGS:
        raise HaloError(f"--grouping must be one of {', '.join(GROUPINGS)}")
    if opts.max_tokens < 2 * opts.context:
        raise HaloError("--max-tokens must be at least twice --context")
    config, tok = source.config, open_tokenizer(source)
    ids: list[int] = []
    described = []
    for name, text in texts:
        t = tok.encode(text, add_bos=False)
        described.append({"name": Path(name).name, "tokens": len(t),
                          "sha256": hashlib.sha256(text.encode()).hexdigest()})
        ids += t
    holdout = min(opts.holdout_tokens, len(ids) // 5)
    train_ids, held_ids = ids[:len(ids) - holdout][:opts.max_tokens], ids[len(ids) - holdout:]
    if len(train_ids) < opts.context:
        raise HaloError(f"the calibration text has only {len(ids)} tokens; give at least "
                        f"{2 * opts.context}")
    train_chunks = chunked(train_ids, opts.context)
    held_chunks = chunked(held_ids, opts.context)
    t0 = time.perf_counter()
    partition = Partition.contiguous(config, opts.attn_groups, opts.mlp_groups)
    if opts.grouping == "contribution":
        step = bar("neuron contributions", len(train_ids))
        contrib = neuron_contributions(config, source.tensor, train_chunks, progress=step)
        partition = by_contribution(config, contrib, opts.attn_groups, opts.mlp_groups)
    gm = GroupedModel(config, source.tensor, partition)
    step = bar("significance", len(train_ids))
    signals = collect(gm, train_chunks, progress=step)
    nets, static = {}, {}
    for kind in KINDS:
        step = bar(f"training {kind} predictors", opts.epochs)
        nets[kind] = train.fit_half(signals, kind, config.n_layers, rank=opts.rank,
                                    epochs=opts.epochs, seed=opts.seed,
                                    progress=lambda e, loss, s=step: s(1))
        static[kind] = torch.stack([signals.sig[(i, kind)].mean(0)
                                    for i in range(config.n_layers)])
    del signals
    meta: dict[str, Any] = {
        "texts": described, "training_tokens": len(train_ids), "context": opts.context,
        "grouping": opts.grouping, "rank": opts.rank, "epochs": opts.epochs,
        "halo_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime())}
    predictor = Predictor(nets, static, partition, content_hash(Path(source.path)), meta)
    if held_chunks:
        step = bar("quality report", len(report.FRACTIONS) * len(report.METHODS))
        predictor.meta["report"] = report.quality(gm, predictor, held_chunks,
                                                  progress=lambda: step(1))
    predictor.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return predictor
