"""`halo generate`: one process, one device."""

from __future__ import annotations

import argparse
import json
import sys
import time

from halollm.cli.options import add_generation_options, checked_request, prompt_ids
from halollm.errors import HaloError
from halollm.generate import LocalDecoder, generate
from halollm.model.loader import dtype_name, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text on this device",
                       description="Load a model on this device, generate from PROMPT and "
                                   "stream the text; report tokens/s at the end (on stderr).")
    add_generation_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet = args.json
    sampling, text = checked_request(args)  # before the slow model load
    t0 = time.perf_counter()
    model = load_model(args.model, args.dtype)
    if not quiet:
        print(f"loaded {model.config.name} ({model.config.n_params() / 1e6:.0f}M params, "
              f"{dtype_name(model.dtype)}) in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
    ids = prompt_ids(model.tokenizer, args, text)
    if not ids:
        raise HaloError("the prompt is empty")

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(LocalDecoder(model.transformer), model.tokenizer, ids,
                      max_tokens=args.max_tokens, sampling=sampling,
                      stop=args.stop, max_position=model.config.max_position,
                      on_text=None if quiet else show, ignore_eos=args.ignore_eos)
    if quiet:
        out = result.to_json()
        out.update(model=str(model.path), dtype=dtype_name(model.dtype))
        print(json.dumps(out))
    else:
        print(file=sys.stdout)
        print(f"[{len(result.token_ids)} tokens, {result.decode_ms_per_token:.1f} ms/token "
              f"({1e3 / max(result.decode_ms_per_token, 1e-9):.1f} tokens/s), prefill "
              f"{result.prompt_tokens} tokens at {result.prefill_tokens_per_s:.0f} tokens/s, "
              f"finish: {result.finish_reason}]", file=sys.stderr)
    return 0
