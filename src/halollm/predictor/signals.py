"""Per-token group significance: the L2 norm of each group's partial residual update.

`GroupedModel` runs a float32 model split by a partition and exposes, per layer, the
normalised input of each half and every group's partial update. Calibration records these
(`collect`); the ablation study masks them (`predictor.ablation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from halollm.groups import Kind, Partition
from halollm.model.config import ModelConfig
from halollm.model.llama import Half, Layer, Transformer, cached

TensorSource = Callable[[str], np.ndarray]
PartsHook = Callable[[int, Kind, torch.Tensor, torch.Tensor], torch.Tensor]


class GroupedModel:
    """A float32 model whose attention is one shard per attention group and whose MLP is one
    shard, split into the partition's MLP groups after the activations (one pass)."""

    def __init__(self, config: ModelConfig, tensor: TensorSource, partition: Partition) -> None:
        partition.validate(config)
        self.config, self.partition = config, partition
        self.model = Transformer(config, cached(tensor, size=16), torch.float32,
                                 attn_sets=[lg.attn for lg in partition.layers])
        self.mlp_index = [[torch.tensor(g, dtype=torch.long) for g in lg.mlp]
                          for lg in partition.layers]

    @property
    def layers(self) -> list[Layer]:
        return self.model.layers

    def attn_parts(self, layer: int, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[G_attn, T, d]: each attention group's partial update."""
        return torch.stack([s.forward(x, start) for s in self.layers[layer].attn])

    def mlp_parts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[G_mlp, T, d]: each MLP group's partial update."""
        (shard,) = self.layers[layer].mlp
        act = shard.activations(x)
        return torch.stack([act[:, i] @ shard.w_down[:, i].T for i in self.mlp_index[layer]])

    def parts(self, layer: int, kind: Kind, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.attn_parts(layer, x, start) if kind == "attn" else self.mlp_parts(layer, x)

    def hidden(self, ids: Sequence[int], on_parts: PartsHook) -> torch.Tensor:
        """The float32 residual stream [T, d] after every layer, each layer half adding the
        sum of the group parts that on_parts(layer, half, x, parts [G, T, d]) returns (it
        may record them, or mask some)."""
        def reduce(i: int, half: Half, _layer: Layer, x: torch.Tensor, start: int
                   ) -> torch.Tensor:
            return on_parts(i, half, x, self.parts(i, half, x, start)).sum(0)

        return self.model.hidden(list(ids), 0, reduce=reduce)


def significance(parts: torch.Tensor) -> torch.Tensor:
    """[G, T, d] partial updates -> [T, G] norms."""
    return parts.norm(dim=-1).T.contiguous()


@dataclass
class Signals:
    """Per layer and half: the normalised inputs [N, d] (fp16) and the true significance of
    every group [N, G] for N calibration tokens."""

    x: dict[tuple[int, Kind], torch.Tensor]
    sig: dict[tuple[int, Kind], torch.Tensor]

    @property
    def tokens(self) -> int:
        return next(iter(self.sig.values())).shape[0]


@torch.inference_mode()
def collect(gm: GroupedModel, chunks: Iterable[list[int]],
            progress: Callable[[int], None] | None = None) -> Signals:
    """Run every chunk (one causal sequence each) through the full model and record the
    inputs and group significances of every layer half."""
    xs: dict[tuple[int, Kind], list[torch.Tensor]] = {}
    sigs: dict[tuple[int, Kind], list[torch.Tensor]] = {}

    def record(i: int, kind: Kind, x: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        xs.setdefault((i, kind), []).append(x.half())
        sigs.setdefault((i, kind), []).append(significance(parts))
        return parts

    for ids in chunks:
        gm.hidden(ids, record)
        if progress is not None:
            progress(len(ids))
    return Signals(x={k: torch.cat(v) for k, v in xs.items()},
                   sig={k: torch.cat(v) for k, v in sigs.items()})


@torch.inference_mode()
def neuron_contributions(config: ModelConfig, tensor: TensorSource,
                         chunks: Iterable[list[int]],
                         progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """[n_layers, intermediate]: each MLP neuron's mean contribution norm over the chunks,
    |activation| x ||its column of the down projection|| (what hot-neuron groups are made of)."""
    gm = GroupedModel(config, tensor, Partition.whole(config))
    total = torch.zeros(config.n_layers, config.intermediate_size)
    n = 0

    def observe(i: int, half: Half, layer: Layer, x: torch.Tensor, start: int) -> torch.Tensor:
        if half == "attn":
            return layer.attn[0].forward(x, start)
        (shard,) = layer.mlp
        act = shard.activations(x)
        total[i] += act.abs().sum(0) * shard.w_down.norm(dim=0)
        return act @ shard.w_down.T

    with torch.inference_mode():
        for ids in chunks:
            gm.model.hidden(ids, 0, reduce=observe)
            n += len(ids)
            if progress is not None:
                progress(len(ids))
    return total / max(n, 1)


def chunked(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of `size` tokens (the last one may be shorter, if at least 8)."""
    out = [ids[i:i + size] for i in range(0, len(ids), size)]
    return [c for c in out if len(c) >= 8]
