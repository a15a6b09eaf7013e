"""Per-position measures on logits, shared by every evaluation, benchmark and ablation (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_nll(logits: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """-log p(targets[i]) under row i of logits [T, vocab] -> [T] (float32)."""
    t = torch.as_tensor(targets, dtype=torch.long)
    return -logits.float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)


def kl_per_position(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(ref || logits) of each row's softmax -> [T] (nats)."""
    logp, logq = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def top1_match(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Whether each row's most likely token is the reference's -> [T] bool."""
    return logits.argmax(-1) == ref.argmax(-1)
