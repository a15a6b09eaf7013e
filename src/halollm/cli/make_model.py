"""`halo make-model`: a LLaMA-shaped model with random weights, for speed measurements."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from halollm.errors import HaloError


def register(sub: argparse._SubParsersAction) -> None:
    from halollm.model.random_model import SHAPES

    p = sub.add_parser(
        "make-model", help="write a random-weight LLaMA model of a given shape (speed tests)",
        description="Write a Hugging Face folder (config.json, fp16 model.safetensors, the "
                    "default model's tokenizer) holding a LLaMA-shaped model with random "
                    "weights: for speed and memory measurements at sizes the default model "
                    "does not have. Its outputs are meaningless; accuracy needs real weights.")
    p.add_argument("out", metavar="DIR", help="folder to write")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b",
                   help="a public model's shape (default tinyllama-1.1b)")
    for name in ("hidden", "intermediate", "layers", "heads", "kv-heads"):
        p.add_argument(f"--{name}", type=int, metavar="N", help=f"override the shape's {name}")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from halollm.model.random_model import SHAPES, write_random_model

    shape = SHAPES[args.shape]
    for name in ("hidden", "intermediate", "layers", "heads", "kv_heads"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise HaloError(f"--{name.replace('_', '-')} must be positive")
            shape = replace(shape, **{name: value})
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise HaloError(f"{out} exists and is not empty")
    print(f"writing {shape.n_params() / 1e9:.2f}B random parameters to {out}…",
          file=sys.stderr, flush=True)
    n = write_random_model(out, shape, args.seed)
    print(f"{out}: {n / 1e9:.2f}B parameters (use --model {out})")
    return 0
