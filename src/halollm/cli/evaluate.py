"""`halo eval …`: accuracy measurements that print (and with --json emit) their numbers."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from halollm.cli.evalrun import (
    add_common_options,
    check_common,
    finish,
    is_cluster,
    note,
    open_target,
)
from halollm.cli.options import add_model_options
from halollm.cli.progress import Bars
from halollm.errors import HaloError
from halollm.eval import agree as agree_eval
from halollm.eval import data, zeroshot
from halollm.eval.ppl import PerplexityTally, check_window, perplexity, sliding_windows
from halollm.generate import LocalDecoder, teacher_forced
from halollm.model.loader import content_hash, load_model, open_source, open_tokenizer, parse_dtype
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
    register_ppl(esub)
    register_zeroshot(esub)
    register_agree(esub)


CLUSTER_NOTE = ("With --workers, --local or --testbed the model runs on that cluster (any "
                "--sync mode, over whatever loss its links have) and is fed one token at a "
                "time: the decode path, which is what runs under loss.")


def register_ppl(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser(
        "ppl", help="perplexity of a text (sliding window)",
        description="Perplexity of a UTF-8 text (e.g. WikiText-2 raw test, wiki.test.raw), "
                    "tokenized whole, with the standard sliding window: windows of --context "
                    "tokens every --stride tokens, each scoring only the tokens no earlier "
                    "window scored (the first window: all but its first token). "
                    + CLUSTER_NOTE)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument("--context", type=int, default=512, metavar="N",
                   help="tokens per window (default 512, at most the model's context)")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="tokens between window starts, at most --context (default: half the "
                        "context)")
    p.add_argument("--limit-tokens", type=int, default=None, metavar="N",
                   help="evaluate only the first N tokens of the tokenized text")
    p.add_argument("--teacher-forced", action="store_true",
                   help="on this device too, feed one token at a time (the decode path)")
    add_common_options(p)
    p.set_defaults(func=run_ppl)


def register_zeroshot(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser(
        "zeroshot", help="zero-shot accuracy (PIQA, LAMBADA, ARC-Easy) by log-likelihood",
        description="Zero-shot accuracy scored by log-likelihood as lm-evaluation-harness "
                    "does: piqa and arc_easy report acc and acc_norm (log-likelihood per "
                    "character of the choice), lambada (OpenAI) the last-word accuracy "
                    "(greedy) and perplexity. Give each --task with its --data file, in "
                    "the same order (formats: docs/eval.md). " + CLUSTER_NOTE)
    p.add_argument("--task", action="append", required=True, choices=sorted(data.READERS),
                   help="task to run (repeatable, each with a --data)")
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="the task's JSONL file (PIQA: valid.jsonl, its valid-labels.lst "
                        "beside it)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N items of each task")
    p.add_argument("--teacher-forced", action="store_true",
                   help="on this device too, feed one token at a time (the decode path)")
    add_common_options(p)
    p.set_defaults(func=run_zeroshot)


def register_agree(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser(
        "agree", help="top-1 agreement and KL against the lossless fp32 model",
        description="Teacher-forced over the first N tokens of a text: how often the "
                    "configuration's most likely next token is the lossless single-device "
                    "fp32 model's, and the mean KL(fp32 || configuration). The configuration "
                    "is this device at --dtype, or the cluster the options name (any --sync, "
                    "any loss).")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument("--tokens", type=int, default=256, metavar="N",
                   help="compare the first N tokens of the text (default 256)")
    add_common_options(p)
    p.set_defaults(func=run_agree)


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


def _positive(name: str, value: int | None, least: int = 1) -> None:
    if value is not None and value < least:
        raise HaloError(f"{name} must be at least {least} (got {value})")


def run_ppl(args: argparse.Namespace) -> int:
    _positive("--limit-tokens", args.limit_tokens, 2)
    check_window(args.context, args.context // 2 if args.stride is None else args.stride)
    check_common(args)
    text = data.read_text(args.text)
    bars = Bars(enabled=not args.json)
    tally, partial = PerplexityTally(), False
    with open_target(args, args.teacher_forced) as target:
        context = min(args.context, target.max_position)
        if context < args.context:
            note(args, f"--context capped at the model's context, {context} tokens")
        stride = max(1, context // 2) if args.stride is None else args.stride
        check_window(context, stride)
        all_ids = target.tokenizer.encode(text)
        ids = all_ids[:args.limit_tokens]
        if len(ids) < 2:
            raise HaloError(f"{args.text}: fewer than 2 tokens, nothing to score")
        windows = sliding_windows(len(ids), context, stride)
        t0 = time.perf_counter()
        advance = bars("perplexity", sum(w.scored for w in windows))
        try:
            perplexity(target.logits, ids, windows, tally, lambda w: advance(w.scored))
        except KeyboardInterrupt:
            partial = True
        finally:
            bars.close()
        seconds = time.perf_counter() - t0
        result: dict[str, Any] = {
            **tally.to_json(), "text": str(args.text), "text_tokens": len(ids),
            "file_tokens": len(all_ids), "context": context, "stride": stride,
            "bos": target.tokenizer.add_bos and target.tokenizer.bos_id is not None,
            **target.info, "seconds": round(seconds, 1)}
        if target.sync is not None:
            result["sync"] = target.sync()
    ppl = "n/a" if result["ppl"] is None else f"{result['ppl']:.4f}"
    summary = (f"perplexity {ppl} over {tally.tokens} tokens ({tally.windows}/{len(windows)} "
               f"windows of {context}, stride {stride}; {result['dtype']}, {result['device']}"
               f", {result['scoring']}) in {seconds:.0f}s")
    return finish(args, result, summary, partial)


def run_zeroshot(args: argparse.Namespace) -> int:
    if len(args.task) != len(args.data):
        raise HaloError(f"give each --task its --data file ({len(args.task)} tasks, "
                        f"{len(args.data)} data files)")
    if len(set(args.task)) != len(args.task):
        raise HaloError("each --task may be given once")
    _positive("--limit", args.limit)
    check_common(args)
    tasks = [(t, d, data.READERS[t](d, args.limit)) for t, d in zip(args.task, args.data,
                                                                   strict=True)]
    bars = Bars(enabled=not args.json)
    tallies: list[zeroshot.TaskTally] = []
    partial = False
    with open_target(args, args.teacher_forced) as target:
        tok = target.tokenizer
        prefix = tok.bos_id if tok.bos_id is not None else min(tok.eos_ids, default=None)
        score = zeroshot.scorer(target.logits, tok.encode, target.max_position, prefix)
        t0 = time.perf_counter()
        try:
            for name, _, items in tasks:
                kind = "cloze" if isinstance(items[0], zeroshot.Cloze) else "choice"
                tally = zeroshot.TaskTally(name, kind, len(items))
                tallies.append(tally)
                advance = bars(name, len(items))
                zeroshot.evaluate(items, score, tally, advance)
        except KeyboardInterrupt:
            partial = True
        finally:
            bars.close()
        seconds = time.perf_counter() - t0
        result: dict[str, Any] = {"tasks": {}, "limit": args.limit, **target.info,
                                  "seconds": round(seconds, 1)}
        for tally, (_, path, _) in zip(tallies, tasks, strict=False):
            result["tasks"][tally.task] = {**tally.to_json(), "data": str(path)}
        if target.sync is not None:
            result["sync"] = target.sync()
    return finish(args, result, _zeroshot_table(result), partial)


def _zeroshot_table(result: dict[str, Any]) -> str:
    def pct(v: float | None, err: float | None = None) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" + (f" ± {100 * err:.1f}" if err is not None else "")

    lines = [f"{'task':<10} {'items':>11} {'acc':>14} {'acc_norm':>14} {'ppl':>9}"]
    for name, r in result["tasks"].items():
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") is not None else "-"
        lines.append(f"{name:<10} {r['items']:>5}/{r['of']:<5} "
                     f"{pct(r['acc'], r['acc_stderr']):>14} "
                     f"{pct(r.get('acc_norm'), r.get('acc_norm_stderr')):>14} {ppl:>9}")
    lines.append(f"({result['dtype']}, {result['device']}, {result['scoring']}; "
                 f"{result['seconds']:.0f}s)")
    return "\n".join(lines)


def run_agree(args: argparse.Namespace) -> int:
    _positive("--tokens", args.tokens)
    check_common(args)
    text = data.read_text(args.text)
    bars = Bars(enabled=not args.json)
    reference = load_model(args.model, "fp32")
    ids = reference.tokenizer.encode(text)[:min(args.tokens, reference.config.max_position)]
    if not ids:
        raise HaloError(f"{args.text}: no tokens to compare")
    if len(ids) < args.tokens:
        note(args, f"comparing {len(ids)} tokens (the text or the model's context is shorter)")
    tally, partial = agree_eval.AgreementTally(), False
    result: dict[str, Any] = {"text": str(args.text)}
    t0 = time.perf_counter()
    try:
        advance = bars("reference (fp32, this device)", len(ids))
        ref = teacher_forced(LocalDecoder(reference.transformer), ids,
                             on_step=lambda i, _: advance(1))
        same = not is_cluster(args) and parse_dtype(args.dtype) == torch.float32 and \
            args.quant in (None, "none")
        loaded = reference if same else None  # fp32 on this device: the reference itself
        del reference
        with open_target(args, teacher_force=True, loaded=loaded) as target:
            result.update(target.info)
            try:
                advance = bars("configuration", len(ids))
                agree_eval.compare_teacher_forced(target.decoder, ids, ref, tally,
                                                  lambda: advance(1))
            except KeyboardInterrupt:
                partial = True
            finally:
                bars.close()
            if target.sync is not None:
                result["sync"] = target.sync()
    except KeyboardInterrupt:
        partial = True
    finally:
        bars.close()
    result.update(tally.to_json(), seconds=round(time.perf_counter() - t0, 1))
    where = f"{result.get('device', '?')}, {result.get('dtype', '?')}"
    if result.get("device") == "cluster":
        where += f", {result['sync_mode']} sync"
    summary = ("agreement n/a (nothing compared)" if not tally.positions else
               f"top-1 agreement {tally.agreed}/{tally.positions} = "
               f"{tally.agreed / tally.positions:.2%}, mean KL {tally.kl:.3g} nats "
               f"({where} vs single-device fp32, teacher-forced)")
    return finish(args, result, summary, partial)
