"""The generation loop, independent of where the model runs (one device or a cluster)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from halollm.errors import HaloError
from halollm.model.llama import Transformer
from halollm.model.tokenizer import TextStream, Tokenizer
from halollm.sampling import SamplingParams, sample


class Decoder(Protocol):
    """Runs the model: tokens at positions start.. -> logits of the last one ([vocab], fp32)."""

    def forward_last(self, ids: Sequence[int], start: int) -> torch.Tensor: ...


class LocalDecoder:
    """The whole model on this device."""

    def __init__(self, transformer: Transformer) -> None:
        self.transformer = transformer

    def forward_last(self, ids: Sequence[int], start: int) -> torch.Tensor:
        return self.transformer.forward(ids, start, last_only=True)[-1]


def teacher_forced(decoder: Decoder, ids: Sequence[int],
                   step_s: list[float] | None = None,
                   on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Logits [len(ids), vocab], feeding ids one token at a time through the decode path
    (whose activations are in the compute dtype, unlike a multi-token prefill). The time of
    each step is appended to `step_s` if given; `on_step(i, logits_i)` sees each position's
    logits as soon as they exist (evaluations that must keep a partial result)."""
    out = []
    for i, t in enumerate(ids):
        t0 = time.perf_counter()
        logits = decoder.forward_last([t], i)
        if step_s is not None:
            step_s.append(time.perf_counter() - t0)
        out.append(logits)
        if on_step is not None:
            on_step(i, logits)
    return torch.stack(out)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prefill_s: float
    step_s: list[float] = field(default_factory=list)  # one per decode step

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * sum(self.step_s) / len(self.step_s) if self.step_s else 0.0

    def speed_text(self) -> str:
        """Decode speed for a summary line ("12.3 ms/token (81.3 tokens/s)"); a run of one
        token has no decode step to time."""
        if not self.step_s:
            return "no decode step timed"
        ms = self.decode_ms_per_token
        return f"{ms:.1f} ms/token ({1e3 / max(ms, 1e-9):.1f} tokens/s)"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "decode_ms_per_token": round(self.decode_ms_per_token, 3),
            "decode_ms_median_per_token": round(1e3 * statistics.median(self.step_s), 3)
            if self.step_s else 0.0,
            "decode_tokens_per_s": round(1e3 / self.decode_ms_per_token, 2)
            if self.step_s else 0.0,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "prefill_ms": round(1e3 * self.prefill_s, 2),
        }


def generate(decoder: Decoder, tokenizer: Tokenizer, prompt_ids: Sequence[int], *,
             max_tokens: int, sampling: SamplingParams, stop: Sequence[str] = (),
             max_position: int | None = None, on_text: Callable[[str], None] | None = None,
             ignore_eos: bool = False) -> GenerationResult:
    """Prefill the prompt in one pass, then decode token by token until EOS (unless
    `ignore_eos`: benchmarks and tests that need a fixed length), a stop string or max_tokens.
    `on_text` receives text as it is produced (held back while it could still become a stop
    string)."""
    if not prompt_ids:
        raise HaloError("the prompt is empty")
    if max_tokens < 1:
        raise HaloError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if max_position is not None and len(prompt_ids) + max_tokens > max_position:
        max_tokens = max_position - len(prompt_ids)
        if max_tokens < 1:
            raise HaloError(f"the prompt ({len(prompt_ids)} tokens) does not fit the model's "
                            f"context ({max_position} tokens)")
    rng = sampling.generator()
    stream = TextStream(tokenizer)
    emitted = 0
    seen = list(prompt_ids)
    out: list[int] = []
    steps: list[float] = []

    t0 = time.perf_counter()
    logits = decoder.forward_last(list(prompt_ids), 0)
    prefill_s = time.perf_counter() - t0
    finish = "length"
    while True:
        token = sample(logits, sampling, seen, rng)
        if token in tokenizer.eos_ids and not ignore_eos:
            finish = "stop"
            break
        out.append(token)
        seen.append(token)
        stream.push(token)
        cut = _find_stop(stream.text, stop)
        if cut is not None:
            finish = "stop"
            break
        safe = len(stream.text) - _held_back(stream.text, stop)
        if on_text is not None and safe > emitted:
            on_text(stream.text[emitted:safe])
            emitted = safe
        if len(out) >= max_tokens:
            break
        t = time.perf_counter()
        logits = decoder.forward_last([token], len(prompt_ids) + len(out) - 1)
        steps.append(time.perf_counter() - t)

    text = stream.text
    cut = _find_stop(text, stop)
    if cut is not None:
        text = text[:cut]
    if on_text is not None and len(text) > emitted:
        on_text(text[emitted:])
    return GenerationResult(text=text, token_ids=out, prompt_tokens=len(prompt_ids),
                            finish_reason=finish, prefill_s=prefill_s, step_s=steps)


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for s in stop if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
