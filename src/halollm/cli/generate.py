"""`halo generate`: one process, one device."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from halollm.cli.options import add_generation_options, checked_request, prompt_ids, set_threads
from halollm.errors import HaloError
from halollm.generate import GenerationResult, LocalDecoder, generate
from halollm.loader.streamed import peak_rss_bytes
from halollm.model.loader import dtype_name, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text on this device",
                       description="Load a model on this device, generate from PROMPT and "
                                   "stream the text; report tokens/s at the end (on stderr).")
    add_generation_options(p)
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="keep at most SIZE of dequantized group weights in memory (e.g. 512M, "
                        "1G, or 25%% of the model's); the rest is read from the memory-mapped "
                        "model file when needed (docs/loader.md). Default: everything resident")
    p.add_argument("--loader", choices=["prefetch", "demand", "window"], default="prefetch",
                   help="with --memory-budget: prefetch (default: keep what is needed "
                        "farthest ahead out, load the next groups in the background), demand "
                        "(no background loading), window (TPI-LLM's sliding window)")
    p.add_argument("--critical-share", type=float, default=None, metavar="S",
                   help="with --memory-budget: relaxed loading -- per layer, MLP groups "
                        "outside the smallest set carrying share S of the calibrated "
                        "significance are left out when not in memory instead of waited for "
                        "(default: wait for every group, exact)")
    p.add_argument("--mlp-groups", type=int, default=None, metavar="N",
                   help="with --memory-budget: MLP groups per layer, the loading unit "
                        "(default 1, the fewest loads and kernel calls; 4 with "
                        "--critical-share, which leaves some of a layer's groups out)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.memory_budget is not None:
        return run_streamed(args)
    quiet = args.json
    sampling, text = checked_request(args)  # before the slow model load
    t0 = time.perf_counter()
    model = load_model(args.model, args.dtype, quant=args.quant)
    if not quiet:
        print(f"loaded {model.config.name} ({model.config.n_params() / 1e6:.0f}M params, "
              f"weights {model.format.name}: {model.weight_bytes / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    ids = prompt_ids(model.tokenizer, args, text)
    if not ids:
        raise HaloError("the prompt is empty")

    result = generate(LocalDecoder(model.transformer), model.tokenizer, ids,
                      max_tokens=args.max_tokens, sampling=sampling,
                      stop=args.stop, max_position=model.config.max_position,
                      on_text=None if quiet else _show, ignore_eos=args.ignore_eos)
    peak = peak_rss_bytes()
    return _report(result, quiet, {"model": str(model.path), "dtype": dtype_name(model.dtype),
                                   "weights": model.format.name,
                                   "weight_bytes": model.weight_bytes,
                                   "threads": torch.get_num_threads(),
                                   "peak_rss_bytes": peak},
                   f", prefill "
                   f"{result.prompt_tokens} tokens at {result.prefill_tokens_per_s:.0f} "
                   f"tokens/s, finish: {result.finish_reason}; weights {model.format.name} "
                   f"{model.weight_bytes / 2**20:.0f} MiB, peak RSS {peak / 2**20:.0f} MiB")


def _show(piece: str) -> None:
    """Stream generated text to stdout as it comes."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def _report(result: GenerationResult, as_json: bool, fields: dict[str, Any],
            summary: str) -> int:
    """The result as one JSON object (with `fields`), or a summary line on stderr after the
    streamed text: tokens, decode speed, then `summary`."""
    if as_json:
        print(json.dumps({**result.to_json(), **fields}))
    else:
        print(file=sys.stdout)
        print(f"[{len(result.token_ids)} tokens, {result.speed_text()}"
              f"{summary}]", file=sys.stderr)
    return 0


def run_streamed(args: argparse.Namespace) -> int:
    """halo generate --memory-budget: group weights streamed from the model file."""
    from halollm.loader.streamed import DEFAULT_MLP_GROUPS, StreamedDecoder, rss_anon_bytes
    from halollm.model.loader import open_source, open_tokenizer, resolve_format

    quiet = args.json
    sampling, text = checked_request(args)
    if args.mlp_groups is not None and args.mlp_groups < 1:
        raise HaloError("--mlp-groups must be at least 1")
    if args.critical_share is not None and not 0 <= args.critical_share <= 1:
        raise HaloError("--critical-share must be between 0 and 1")
    source = open_source(args.model)
    try:
        fmt = resolve_format(source, args.dtype, args.quant)
        tokenizer = open_tokenizer(source)
        decoder = StreamedDecoder(source, fmt, args.memory_budget, args.loader,
                                  mlp_groups=args.mlp_groups or DEFAULT_MLP_GROUPS,
                                  critical_share=args.critical_share)
    except BaseException:
        source.close()
        raise
    try:
        if not quiet:
            print(f"{source.config.name}: keeping at most {decoder.budget / 2**20:.0f} MiB of "
                  f"its {decoder.model_bytes / 2**20:.0f} MiB of group weights "
                  f"({fmt.name}) in memory, loader: {args.loader}",
                  file=sys.stderr, flush=True)
        ids = prompt_ids(tokenizer, args, text)
        if not ids:
            raise HaloError("the prompt is empty")

        result = generate(decoder, tokenizer, ids, max_tokens=args.max_tokens,
                          sampling=sampling, stop=args.stop,
                          max_position=source.config.max_position,
                          on_text=None if quiet else _show, ignore_eos=args.ignore_eos)
        loader = decoder.loader_json()
        loader["rss_anon_bytes"] = rss_anon_bytes()  # with the store still full
        weight_bytes = decoder.weight_bytes()
    finally:
        decoder.close()
        source.close()
    peak = peak_rss_bytes()
    return _report(result, quiet, {"model": str(source.path), "dtype": dtype_name(fmt.dtype),
                                   "weights": fmt.name, "weight_bytes": weight_bytes,
                                   "loader": loader, "peak_rss_bytes": peak},
                   f"; loader: {loader['hits']} hits, {loader['misses']} misses, "
                   f"{loader['bytes_loaded'] / 2**20:.0f} MiB read, stalled "
                   f"{loader['stall_ms']:.0f} ms; peak RSS {peak / 2**20:.0f} MiB")
