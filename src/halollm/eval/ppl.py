"""Perplexity of a token stream with the standard sliding window (pure except for the model
call).

Windows of `context` tokens start every `stride` tokens (Hugging Face's "Perplexity of
fixed-length models"); each window is scored from position 0 as an independent sequence, and
only the tokens no earlier window scored count: the first window scores all its tokens but
the first (nothing predicts it), every later window its last `end - previous end` tokens, so
each token after the first is scored once, with at least `context - stride` tokens of
context (none for the first token of a window when stride == context, which is then not
scored, as in that document).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from halollm.errors import HaloError
from halollm.eval import LogitsFn
from halollm.metrics import token_nll


@dataclass(frozen=True)
class Window:
    """tokens[begin:end] go into the model; tokens[first_scored:end] are scored."""

    begin: int
    end: int
    first_scored: int

    @property
    def scored(self) -> int:
        return self.end - self.first_scored


def check_window(context: int, stride: int) -> None:
    if context < 2:
        raise HaloError(f"--context must be at least 2 tokens (got {context})")
    if stride < 1:
        raise HaloError(f"--stride must be at least 1 (got {stride})")
    if stride > context:
        raise HaloError(f"--stride ({stride}) must not exceed --context ({context}): tokens "
                        "between windows would never be scored")


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    check_window(context, stride)
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class PerplexityTally:
    """What has been scored so far (a partial result stays meaningful)."""

    nll_sum: float = 0.0
    tokens: int = 0
    windows: int = 0

    def add(self, nll_sum: float, tokens: int) -> None:
        self.nll_sum += nll_sum
        self.tokens += tokens
        self.windows += 1

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.tokens else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"ppl": round(self.ppl, 4) if self.tokens else None,
                "nll": round(self.nll, 6) if self.tokens else None,
                "nll_sum": round(self.nll_sum, 4), "tokens": self.tokens,
                "windows": self.windows}


def score_window(logits_fn: LogitsFn, ids: Sequence[int], w: Window) -> tuple[float, int]:
    """(summed NLL, count) of the window's scored tokens."""
    seq = list(ids[w.begin:w.end])
    k = w.first_scored - w.begin  # >= 1: row k-1 predicts seq[k]
    logits = logits_fn(seq)
    nll = token_nll(logits[k - 1:-1], seq[k:])
    return float(nll.double().sum()), len(seq) - k


def perplexity(logits_fn: LogitsFn, ids: Sequence[int], windows: Sequence[Window],
               tally: PerplexityTally | None = None,
               on_window: Callable[[Window], None] | None = None) -> PerplexityTally:
    """Score the windows in order into `tally` (pass your own to keep it if interrupted)."""
    tally = PerplexityTally() if tally is None else tally
    for w in windows:
        tally.add(*score_window(logits_fn, ids, w))
        if on_window is not None:
            on_window(w)
    return tally
