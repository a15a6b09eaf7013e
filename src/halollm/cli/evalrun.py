"""What the `halo eval ppl|zeroshot|agree` commands share: where the model runs (this device
or a cluster), their common options, Ctrl-C turning into a partial result, and the output
(a summary, --json, --out FILE)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from halollm.cli.options import add_model_options, set_threads
from halollm.cli.run import add_cluster_options, check_cluster_options, open_cluster
from halollm.errors import HaloError
from halollm.eval import LogitsFn
from halollm.generate import Decoder, LocalDecoder, teacher_forced
from halollm.model.loader import LoadedModel, dtype_name, load_model
from halollm.model.tokenizer import Tokenizer

INTERRUPTED = 130  # exit code of an interrupted evaluation (its partial result is printed)


def add_common_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p, quant=True)
    add_cluster_options(p, required=False)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch compute threads of this process (default: PyTorch's choice; "
                        "1 when sharing a small machine with local workers)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the summary (no progress bars)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="also write the JSON result to FILE (a partial one if interrupted)")


def is_cluster(args: argparse.Namespace) -> bool:
    return getattr(args, "discover", False) or any(
        getattr(args, k, None) is not None for k in ("workers", "local", "testbed"))


def check_common(args: argparse.Namespace) -> None:
    """The shared options' checks, before anything slow."""
    set_threads(args.threads)
    if args.out is not None:
        _check_writable(args.out)
    check_cluster_options(args)


def _check_writable(path: Path) -> None:
    """Fail now, not after an hour of scoring, if the result cannot be written."""
    if path.is_dir():
        raise HaloError(f"--out {path}: is a directory")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise HaloError(f"--out {path}: {folder} is not a writable folder")


@dataclass
class Target:
    """The model under evaluation, wherever it runs."""

    decoder: Decoder
    logits: LogitsFn  # a whole sequence from position 0, on this device or teacher-forced
    tokenizer: Tokenizer
    max_position: int
    info: dict[str, Any]  # model, dtype, device, scoring path
    sync: Callable[[], dict[str, Any]] | None = None  # cluster synchronisation statistics


@contextmanager
def open_target(args: argparse.Namespace, teacher_force: bool = False,
                loaded: LoadedModel | None = None) -> Iterator[Target]:
    """This device (`--model`, `--dtype`; `loaded` if it is already in memory) or the
    cluster the options name. On one device a sequence is scored in one pass unless
    `teacher_force`; a cluster's Decoder only gives the last position's logits, so there
    every sequence is fed one token at a time (the decode path, which is what runs under
    loss)."""
    if is_cluster(args):
        coord = local = None
        try:
            coord, local = open_cluster(args, quiet=args.json)
            decoder = coord
            info = {"model": str(coord.source.path), "dtype": dtype_name(coord.dtype),
                    "weights": coord.format.name, "device": "cluster", "sync_mode": args.mode,
                    "scoring": "teacher-forced"}
            yield Target(decoder, lambda ids: teacher_forced(decoder, ids), coord.tokenizer,
                         coord.config.max_position, info, lambda: _sync_summary(decoder))
        finally:
            if coord is not None:
                coord.close()
            if local is not None:
                local.stop()
        return
    model = loaded if loaded is not None else load_model(args.model, args.dtype,
                                                         quant=args.quant)
    transformer = model.transformer
    local_decoder = LocalDecoder(transformer)
    info = {"model": str(model.path), "dtype": dtype_name(model.dtype),
            "weights": model.format.name, "weight_bytes": model.weight_bytes, "device": "single",
            "scoring": "teacher-forced" if teacher_force else "one pass"}

    def one_pass(ids: Any) -> torch.Tensor:
        return transformer.forward(ids, 0)

    yield Target(local_decoder,
                 (lambda ids: teacher_forced(local_decoder, ids)) if teacher_force else one_pass,
                 model.tokenizer, model.config.max_position, info)


def _sync_summary(coord: Any) -> dict[str, Any]:
    """The cluster's synchronisation statistics without the per-token list (an evaluation
    runs thousands of tokens)."""
    return {k: v for k, v in coord.sync_json().items() if k != "per_token"}


def note(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(message, file=sys.stderr, flush=True)


def finish(args: argparse.Namespace, result: dict[str, Any], summary: str,
           partial: bool) -> int:
    """Print (and with --out write) the result; an interrupted run says so and exits 130."""
    result["partial"] = partial
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise HaloError(f"--out {args.out}: cannot write ({exc.strerror})") from None
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        if partial:
            summary = "interrupted: partial result\n" + summary
        print(summary, flush=True)
    return INTERRUPTED if partial else 0
