"""The LM head split by vocabulary rows over the workers (`--head workers`).

The coordinator norms the last hidden state and sends it in a round of its own (phase
HEAD); each worker returns the logits of its rows, in the compute dtype's wire (lossless:
they are the product's own precision), and the round places them side by side. The
coordinator keeps the whole head: it refines the best candidates in float32 as always, and
computes a worker's rows itself when they miss the deadline (the rows of a slice are bitwise
the whole head's: `tests/test_head_split.py`). Every logit counts, so a head round waits for all
of its rows, and the split is dealt out again over the live workers with every plan.
"""

from __future__ import annotations

import torch

from halollm.groups import head_spans
from halollm.model.llama import Transformer, project
from halollm.runtime.links import WorkerLink
from halollm.runtime.protocol import RoundTag
from halollm.runtime.rounds import Rounds
from halollm.runtime.stats import SyncStats
from halollm.runtime.tensor_codec import wire_for_dtype


class HeadSplit:
    def __init__(self, model: Transformer, rounds: Rounds, stats: SyncStats) -> None:
        self.model, self.rounds, self.stats = model, rounds, stats
        self.spans: dict[int, tuple[int, int]] = {}  # worker -> (first row, rows)
        self._full: tuple[RoundTag, torch.Tensor] | None = None  # a round's whole head

    def deal(self, workers: list[int]) -> None:
        """Split the rows over these workers (none: the coordinator computes the head)."""
        self.spans = head_spans(self.model.config.vocab_size, workers) if workers else {}

    def logits(self, h: torch.Tensor, pos: int, links: list[WorkerLink]) -> torch.Tensor:
        """float32 logits [vocab] of the last position of h [1, d]: the head here, or its
        rows from the workers while every one that holds some is alive."""
        targets = [lk for lk in links if lk.index in self.spans]
        if not targets or not all(lk.alive for lk in targets):
            return self.model.logits(h)[-1]
        x = self.model.head_input(h)
        logits = self.rounds.head(x, pos, targets, self.spans, self.model.config.vocab_size,
                                  wire_for_dtype(self.model.dtype))
        return self.model.refine(x, logits)[-1]

    def rows(self, link: WorkerLink, tag: RoundTag, x: torch.Tensor) -> torch.Tensor:
        """A worker's rows missing at the deadline, computed here: the whole head once per
        round, zeros outside the worker's rows."""
        if self._full is None or self._full[0] != tag:
            self._full = (tag, project(x, self.model.lm_head).float())
        full = self._full[1]
        first, n = self.spans[link.index]
        out = torch.zeros_like(full)
        out[:, first:first + n] = full[:, first:first + n]
        self.stats.head_recomputed += 1
        return out
