"""Top-1 agreement and KL of a configuration against a reference, position by position."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from halollm.generate import Decoder, teacher_forced
from halollm.metrics import kl_per_position, top1_match


def accuracy(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || logits)) over positions."""
    return (float(top1_match(logits, ref).float().mean()),
            float(kl_per_position(logits, ref).mean()))


@dataclass
class AgreementTally:
    """Positions compared so far (a partial result stays meaningful)."""

    positions: int = 0
    agreed: int = 0
    kl_sum: float = 0.0

    def add(self, logits: torch.Tensor, ref: torch.Tensor) -> None:
        """logits, ref: [T, vocab] or [vocab]."""
        logits, ref = logits.reshape(-1, logits.shape[-1]), ref.reshape(-1, ref.shape[-1])
        self.agreed += int(top1_match(logits, ref).sum())
        self.kl_sum += float(kl_per_position(logits, ref).double().sum())
        self.positions += logits.shape[0]

    def to_json(self) -> dict[str, Any]:
        n = self.positions
        return {"agreement": round(self.agreed / n, 4) if n else None,
                "kl": round(self.kl_sum / n, 6) if n else None, "tokens": n,
                "agreed": self.agreed}

    @property
    def kl(self) -> float:
        return self.kl_sum / self.positions if self.positions else math.nan


def compare_teacher_forced(decoder: Decoder, ids: Sequence[int], ref: torch.Tensor,
                           tally: AgreementTally | None = None,
                           on_token: Callable[[], None] | None = None) -> AgreementTally:
    """Feed ids through `decoder` one token at a time; compare each position's logits with
    ref[i] (the reference's logits for the same ids) into `tally`."""
    tally = AgreementTally() if tally is None else tally

    def step(i: int, logits: torch.Tensor) -> None:
        tally.add(logits, ref[i])
        if on_token is not None:
            on_token()

    teacher_forced(decoder, ids, on_step=step)
    return tally
