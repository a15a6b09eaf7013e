"""Group formation from calibration: MLP neurons ordered by their mean contribution.

Contiguous blocks mix a layer's few dominant ("hot") neurons with many quiet ones, so every
block matters a little and none can be lost cheaply. Ordering each layer's neurons by their
calibrated mean contribution and cutting the order into equal groups puts the hot neurons
together in the first groups (kept reliable) and leaves groups whose contribution is small
for most tokens — the ones worth letting a lossy link carry.
"""

from __future__ import annotations

import torch

from halollm.groups import LayerGroups, Partition, split_evenly
from halollm.model.config import ModelConfig


def by_contribution(config: ModelConfig, contributions: torch.Tensor, attn_groups: int | None,
                    mlp_groups: int) -> Partition:
    """contributions [n_layers, intermediate] (signals.neuron_contributions) -> a partition
    whose MLP group 0 of each layer holds its hottest neurons, group 1 the next, and so on
    (units sorted within a group); attention groups as in Partition.contiguous."""
    base = Partition.contiguous(config, attn_groups, mlp_groups)
    sizes = [len(g) for g in split_evenly(config.intermediate_size, mlp_groups)]
    layers = []
    for i, lg in enumerate(base.layers):
        order = contributions[i].argsort(descending=True).tolist()
        groups, start = [], 0
        for size in sizes:
            groups.append(tuple(sorted(order[start:start + size])))
            start += size
        layers.append(LayerGroups(attn=lg.attn, mlp=tuple(groups)))
    return Partition(layers=tuple(layers))
