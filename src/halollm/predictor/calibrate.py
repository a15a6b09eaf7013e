"""`halo calibrate` as a library call: calibration text in, a checked Predictor out."""

from __future__ import annotations

import ctypes
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from halollm import __version__
from halollm.errors import HaloError
from halollm.groups import KINDS, Partition
from halollm.model.loader import ModelSource, content_hash, open_source, open_tokenizer
from halollm.predictor import report, store, train
from halollm.predictor.partition import by_contribution
from halollm.predictor.signals import GroupedModel, chunked, neuron_contributions
from halollm.predictor.store import Predictor

GROUPINGS = ("contribution", "contiguous")
# Shipped in the package (src/halollm/data/, provenance in its README.md): the default text.
DEFAULT_TEXT = "alice_in_wonderland.pg11.body.txt"
# The quality report's sequences: at most this many tokens each. Its peak memory is a few
# [tokens, vocab] float32 logits per sequence (~25 MB each at 128 tokens for SmolLM2).
REPORT_CONTEXT = 128


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
    sample_tokens: int | None = None  # inputs kept for training; None: what RECORD_BYTES fits


Bar = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


def default_text() -> Path:
    """The calibration book shipped in the package (a real file in any installed copy)."""
    return Path(str(resources.files("halollm").joinpath("data", DEFAULT_TEXT)))


def read_texts(paths: Sequence[str | Path] | None) -> list[tuple[str, str]]:
    """(name, text) of each file; no paths: the shipped book."""
    if not paths:
        paths = [default_text()]
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
    if opts.sample_tokens is not None and opts.sample_tokens < 1:
        raise HaloError("--sample-tokens must be at least 1")
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
    held_chunks = chunked(held_ids, min(opts.context, REPORT_CONTEXT))
    t0 = time.perf_counter()
    lean_heap()
    partition = Partition.contiguous(config, opts.attn_groups, opts.mlp_groups)
    if opts.grouping == "contribution":
        step = bar("neuron contributions", len(train_ids))
        contrib = neuron_contributions(config, source.tensor, train_chunks, progress=step)
        partition = by_contribution(config, contrib, opts.attn_groups, opts.mlp_groups)
    gm = GroupedModel(config, source.tensor, partition)
    sample = opts.sample_tokens if opts.sample_tokens is not None else train.sample_size(gm)
    step = bar("significance", len(train_ids))
    data = train.record(gm, train_chunks, sample, seed=opts.seed, progress=step)
    del gm  # the float32 model is not needed while training (peak memory); rebuilt below
    trim_heap()
    nets = _fit(data, config.n_layers, config.hidden_size, partition, opts, bar)
    static = {kind: data.static(kind) for kind in KINDS}
    sampled = data.sampled
    del data
    trim_heap()
    meta: dict[str, Any] = {
        "texts": described, "training_tokens": len(train_ids), "sampled_tokens": sampled,
        "context": opts.context,
        "grouping": opts.grouping, "rank": opts.rank, "epochs": opts.epochs,
        "halo_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime())}
    predictor = Predictor(nets, static, partition, content_hash(Path(source.path)), meta)
    if held_chunks:
        step = bar("quality report", len(report.FRACTIONS) * len(report.METHODS)
                   * len(held_chunks))
        gm = GroupedModel(config, source.tensor, partition)
        predictor.meta["report"] = merge_reports(
            [report.quality(gm, predictor, [c], progress=lambda: step(1)) for c in held_chunks])
    predictor.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return predictor


def _fit(data: train.TrainingSet, n_layers: int, dim: int, partition: Partition,
         opts: CalibrationOptions, bar: Bar) -> dict:
    nets = {}
    for kind in KINDS:
        if kind not in data.x:  # one group: nothing to predict
            nets[kind] = train.untrained(n_layers, dim, opts.rank, partition.count(0, kind),
                                         opts.seed)
            continue
        step = bar(f"training {kind} predictors", opts.epochs)
        nets[kind] = train.fit_half(data.x[kind], data.share[kind], rank=opts.rank,
                                    epochs=opts.epochs, seed=opts.seed,
                                    progress=lambda e, loss, s=step: s(1),
                                    center=data.center[kind], scale=data.scale[kind])
    return nets


def ensure_predictor(model: str | Path | None, bar: Bar, log: Callable[[str], None],
                     opts: CalibrationOptions | None = None) -> Path:
    """The predictor saved for the model (what `--predictor auto` finds); if there is none
    that fits it, calibrate once on the shipped book and save it where `halo calibrate`
    would."""
    lean_heap()
    source = open_source(model)
    try:
        model_path, model_hash = Path(source.path), content_hash(Path(source.path))
        found = store.find(model_path, model_hash)
        if found is not None:
            try:
                store.load(found).check(model_hash, where=str(found))
                return found
            except HaloError as exc:
                log(f"not using {found}: {exc}")
        opts = opts or CalibrationOptions()
        log(f"no predictor saved for {model_path.name}: calibrating once on the shipped book "
            f"({opts.max_tokens} tokens; `halo calibrate` does the same)")
        predictor = calibrate(source, read_texts(None), opts, bar)
        path = store.writable_path(model_path, model_hash)
        store.save(predictor, path)
    finally:
        source.close()
    log(f"saved the predictor to {path} ({predictor.meta['seconds']:.0f}s)")
    return path


def merge_reports(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One quality report from reports of single sequences (each report's peak memory is one
    sequence's logits): position-weighted means of KL, agreement and the ranking scores, and
    the prediction-weighted geometric mean of perplexities (= exp of the mean NLL)."""
    if len(parts) == 1:
        return parts[0]
    tokens = [p["tokens"] for p in parts]
    preds = [t - 1 for t in tokens]

    def mean(values: Sequence[float], weights: Sequence[int]) -> float:
        return sum(v * w for v, w in zip(values, weights, strict=True)) / max(sum(weights), 1)

    def ppl(values: Sequence[float]) -> float:
        return round(math.exp(mean([math.log(v) for v in values], preds)), 3)

    results: dict[str, dict[str, dict]] = {}
    for frac, row in parts[0]["results"].items():
        results[frac] = {m: {
            "kl": round(mean([p["results"][frac][m]["kl"] for p in parts], tokens), 5),
            "agreement": round(mean([p["results"][frac][m]["agreement"] for p in parts],
                                    tokens), 4),
            "ppl": ppl([p["results"][frac][m]["ppl"] for p in parts]),
            "dropped_per_layer": cell["dropped_per_layer"]} for m, cell in row.items()}
    ranking = {kind: {k: v if k == "top_fraction" else round(
        mean([p["ranking"][kind][k] for p in parts], tokens), 4) for k, v in q.items()}
        for kind, q in parts[0]["ranking"].items()}
    return {"tokens": sum(tokens), "sequences": len(parts), "kinds": parts[0]["kinds"],
            "ranking": ranking, "full": {"ppl": ppl([p["full"]["ppl"] for p in parts])},
            "results": results,
            "gap_closed": {f: report.gap_closed(row) for f, row in results.items()}}


def lean_heap() -> None:
    """glibc only (elsewhere nothing): serve allocations of 256 KiB and more by mmap, so freed
    tensors go back to the system instead of fragmenting the heap. Without this, glibc's
    adaptive threshold moves every temporary of a few MB to the heap and calibration's
    resident memory grows far beyond what it holds."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


def trim_heap() -> None:
    """glibc only: give free heap pages back to the system (after a stage frees a lot)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both exist: glibc)
    except (OSError, AttributeError):
        return None
    return libc
