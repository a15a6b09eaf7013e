"""Accuracy evaluations (`halo eval ppl|zeroshot|agree`), independent of where the model runs.

Every scorer takes a `LogitsFn` (token ids at positions 0.. -> float32 logits, one row per
position): the whole model on this device in one pass, or a cluster teacher-forced one token
at a time through the `Decoder` interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LogitsFn = Callable[[Sequence[int]], torch.Tensor]
"""ids at positions 0..T-1 -> float32 logits [T, vocab]; row i predicts ids[i + 1]."""
