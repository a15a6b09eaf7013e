"""The per-layer predictor: a two-layer low-rank network (d -> rank -> groups, ReLU between)
per layer and half, reading the normalised input of that half and giving one score per group.
softmax(scores) is the predicted share of the half's significance each group carries; the
order of the scores is the predicted ranking.

All layers of one half are stored stacked ([n_layers, ...]) so training runs them in one
batched product; inference uses one layer's slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HalfPredictor:
    """Stacked weights of every layer's predictor for one half (attention or MLP)."""

    w1: torch.Tensor  # [L, rank, d]
    b1: torch.Tensor  # [L, rank]
    w2: torch.Tensor  # [L, G, rank]
    b2: torch.Tensor  # [L, G]

    @property
    def groups(self) -> int:
        return self.w2.shape[1]

    @property
    def rank(self) -> int:
        return self.w1.shape[1]

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] (any float dtype) -> scores [T, G] (float32)."""
        hidden = torch.addmm(self.b1[layer], x.float(), self.w1[layer].T).relu_()
        return torch.addmm(self.b2[layer], hidden, self.w2[layer].T)

    def scores_all(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, N, d] -> [L, N, G] for every layer at once (training, evaluation)."""
        hidden = (torch.baddbmm(self.b1[:, None], x.float(), self.w1.transpose(1, 2))).relu()
        return torch.baddbmm(self.b2[:, None], hidden, self.w2.transpose(1, 2))

    def parameters(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2]

    @classmethod
    def init(cls, n_layers: int, dim: int, rank: int, groups: int,
             generator: torch.Generator) -> HalfPredictor:
        def uniform(*shape: int, fan_in: int) -> torch.Tensor:
            bound = fan_in ** -0.5
            return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

        return cls(w1=uniform(n_layers, rank, dim, fan_in=dim),
                   b1=uniform(n_layers, rank, fan_in=dim),
                   w2=uniform(n_layers, groups, rank, fan_in=rank),
                   b2=torch.zeros(n_layers, groups))

    def folded(self, mean: torch.Tensor, std: torch.Tensor) -> HalfPredictor:
        """The same network taking raw inputs, for one trained on (x - mean) / std
        (mean, std: [L, d])."""
        w1 = self.w1 / std[:, None, :]
        b1 = self.b1 - torch.einsum("lrd,ld->lr", w1, mean)
        return HalfPredictor(w1.contiguous(), b1.contiguous(), self.w2.contiguous(),
                             self.b2.contiguous())
