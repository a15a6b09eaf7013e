"""Zero-shot scoring by log-likelihood, as lm-evaluation-harness does it (pure except for the
model call).

A request is a (context, continuation) pair of strings. Tokenization follows the harness:
trailing whitespace of the context moves to the front of the continuation; the context is
encoded alone, the whole string context + continuation is encoded, and the continuation's
tokens are the whole encoding from the context's token count on. The model sees
context tokens + continuation tokens (all but the last, cut on the left to the model's
context) and the continuation's log-likelihood is the sum of its tokens' log-probabilities;
it is "greedy" when every continuation token is the argmax at its position.

Multiple choice (PIQA, ARC): the continuations are " " + each choice; `acc` picks the
highest log-likelihood, `acc_norm` the highest log-likelihood divided by the choice's length
in characters (the choice text without the leading space: the harness's `acc_norm`).
Cloze (LAMBADA): `acc` = the target is greedy; `ppl` = exp(-mean per-item log-likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from halollm.errors import HaloError
from halollm.eval import LogitsFn


@dataclass(frozen=True)
class MultipleChoice:
    context: str
    choices: tuple[str, ...]  # choice texts; scored as " " + choice
    gold: int


@dataclass(frozen=True)
class Cloze:
    context: str
    target: str  # the continuation, leading space included


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float
    greedy: bool
    tokens: int


Encode = Callable[[str], list[int]]
Scorer = Callable[[str, str], LogLikelihood]


def encode_pair(encode: Encode, context: str, continuation: str,
                prefix_id: int | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the harness way. An empty context becomes
    [prefix_id] (the harness uses the BOS/EOS token there)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        if prefix_id is None:
            raise HaloError("an item has an empty context and the model has no BOS/EOS token")
        return [prefix_id], encode(continuation)
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def loglikelihood(logits_fn: LogitsFn, ctx: Sequence[int], cont: Sequence[int],
                  max_length: int) -> LogLikelihood:
    if not cont:
        raise HaloError("a continuation encodes to no tokens")
    ids = (list(ctx) + list(cont))[-(max_length + 1):]
    logits = logits_fn(ids[:-1])[-len(cont):]  # the rows that predict the continuation
    logp = logits.float().log_softmax(-1)
    target = logp.new_tensor(list(cont)).long()
    lp = logp.gather(1, target[:, None]).squeeze(1)
    greedy = bool((logits.argmax(-1) == target).all())
    return LogLikelihood(float(lp.double().sum()), greedy, len(cont))


def scorer(logits_fn: LogitsFn, encode: Encode, max_length: int,
           prefix_id: int | None = None) -> Scorer:
    def score(context: str, continuation: str) -> LogLikelihood:
        ctx, cont = encode_pair(encode, context, continuation, prefix_id)
        return loglikelihood(logits_fn, ctx, cont, max_length)
    return score


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first of ties, as numpy


@dataclass
class TaskTally:
    """Per-item outcomes of one task so far (a partial result stays meaningful)."""

    task: str
    kind: str  # "choice" or "cloze"
    total: int  # items selected
    correct: list[bool] = field(default_factory=list)
    correct_norm: list[bool] = field(default_factory=list)  # choice tasks
    logprobs: list[float] = field(default_factory=list)  # cloze: the target's

    @property
    def items(self) -> int:
        return len(self.correct)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "items": self.items, "of": self.total,
                               "partial": self.items < self.total}
        out.update(_rate("acc", self.correct))
        if self.kind == "choice":
            out.update(_rate("acc_norm", self.correct_norm[:self.items]))
        elif self.items:
            lps = self.logprobs[:self.items]
            out["ppl"] = round(math.exp(-sum(lps) / len(lps)), 4)
        else:
            out["ppl"] = None
        return out


def _rate(name: str, hits: Sequence[bool]) -> dict[str, Any]:
    n = len(hits)
    if not n:
        return {name: None, f"{name}_stderr": None}
    p = sum(hits) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None  # sample stderr of the mean
    return {name: round(p, 4), f"{name}_stderr": None if stderr is None else round(stderr, 4)}


def score_choice(item: MultipleChoice, score: Scorer) -> tuple[bool, bool]:
    """(acc, acc_norm) of one multiple-choice item."""
    lls = [score(item.context, " " + c).logprob for c in item.choices]
    norm = [ll / max(len(c), 1) for ll, c in zip(lls, item.choices, strict=True)]
    return _argmax(lls) == item.gold, _argmax(norm) == item.gold


def evaluate(items: Sequence[MultipleChoice] | Sequence[Cloze], score: Scorer,
             tally: TaskTally, on_item: Callable[[], None] | None = None) -> TaskTally:
    """Score the items in order into `tally` (pass your own to keep it if interrupted)."""
    for item in items:
        if isinstance(item, MultipleChoice):
            acc, acc_norm = score_choice(item, score)
            tally.correct_norm.append(acc_norm)
        else:
            ll = score(item.context, item.target)
            acc = ll.greedy
            tally.logprobs.append(ll.logprob)
        tally.correct.append(acc)  # last: `items` counts only complete items
        if on_item is not None:
            on_item()
    return tally
