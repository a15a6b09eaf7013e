"""Per-token criticality: which groups must arrive, from predicted significance shares."""

from __future__ import annotations

import torch


def critical_groups(share: torch.Tensor, target: float) -> torch.Tensor:
    """share [T, G] (predicted share of each group, rows sum to 1) -> bool [T, G]: per token,
    the smallest set of groups whose shares add up to `target` (0: none, 1: all)."""
    if target <= 0:
        return torch.zeros_like(share, dtype=torch.bool)
    if target >= 1:
        return torch.ones_like(share, dtype=torch.bool)
    ordered, order = share.sort(dim=-1, descending=True)
    needed = (ordered.cumsum(-1) - ordered) < target
    return torch.zeros_like(needed).scatter_(-1, order, needed)


def membership(owner: list[int], n_devices: int) -> torch.Tensor:
    """[G, n_devices] float: 1 where group g lives on device d."""
    m = torch.zeros(len(owner), n_devices)
    m[torch.arange(len(owner)), torch.tensor(owner)] = 1.0
    return m


def critical_devices(critical: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """critical [T, G] bool, member [G, D] -> bool [D]: devices holding a critical group for
    any of the T tokens."""
    return (critical.float() @ member).amax(0) > 0
