"""Criticality: which groups' contributions must arrive. Per token at run time, from the
predictor's shares; per layer half for a static plan, from the calibrated significance.
Both are the smallest set of groups carrying a share of the total (`carrying`).

The per-token path runs once per layer half and token on the coordinator's critical path,
so it is written for one-row inputs in numpy (~18 µs per layer half here, against ~48 µs for
the same in torch).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from halollm.errors import HaloError
from halollm.groups import KINDS, GroupId, Partition
from halollm.predictor.net import HalfPredictor


class SharePredictor:
    """A HalfPredictor's layers as float32 numpy arrays: x [T, d] -> predicted shares
    [T, G] (softmax of the scores: each group's predicted share of the half's significance)."""

    def __init__(self, net: HalfPredictor) -> None:
        self.net = net
        self.layers = [tuple(t[i].numpy().astype(np.float32) for t in net.parameters())
                       for i in range(net.w1.shape[0])]

    def shares(self, layer: int, x: torch.Tensor) -> np.ndarray:
        if x.shape[0] > 1:  # prefill: torch (bounded threads) rather than numpy's BLAS
            net = self.net
            return net.scores(layer, x).softmax(-1).numpy()
        w1, b1, w2, b2 = self.layers[layer]
        xv = x.detach().float().numpy()
        hidden = xv @ w1.T
        hidden += b1
        np.maximum(hidden, 0, out=hidden)
        s = hidden @ w2.T
        s += b2
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return s


def carrying(values: np.ndarray, share: float) -> np.ndarray:
    """values [G] (not negative) -> the indices of the smallest set of groups whose values
    add up to `share` of their total, the largest first: groups are taken while what is
    taken is below the share (share 0 or less: none; 1 or more, or a total of 0: all)."""
    if share <= 0:
        return np.empty(0, dtype=np.intp)
    order = np.argsort(-values, kind="stable")
    if share >= 1:
        return order
    cum = np.cumsum(values[order])
    if cum[-1] <= 0:
        return order
    return order[:int(np.searchsorted(cum, share * cum[-1])) + 1]


def critical_mask(shares: np.ndarray, target: float) -> np.ndarray:
    """shares [T, G] -> bool [T, G]: per token, the groups `carrying` `target` of its
    shares."""
    out = np.zeros(shares.shape, dtype=bool)
    for t, row in enumerate(shares):
        out[t, carrying(row, target)] = True
    return out


def critical_devices(shares: np.ndarray, target: float, owner: np.ndarray) -> set[int]:
    """Devices (owner[g] = device of group g) holding a critical group for any token."""
    if shares.shape[0] == 1:  # decoding: one token, the hot path
        return set(owner[carrying(shares[0], target)].tolist())
    return set(owner[critical_mask(shares, target).any(axis=0)].tolist())


def critical_groups(partition: Partition, significance: Mapping[GroupId, float],
                    share: float) -> frozenset[GroupId]:
    """Per layer half, the groups `carrying` `share` of its total significance."""
    if not 0.0 <= share <= 1.0:
        raise HaloError(f"a significance share must be between 0 and 1 (got {share})")
    out: set[GroupId] = set()
    for layer in range(len(partition.layers)):
        for kind in KINDS:
            gids = [GroupId(layer, kind, i) for i in range(partition.count(layer, kind))]
            values = np.array([significance.get(g, 0.0) for g in gids], dtype=np.float64)
            out.update(gids[i] for i in carrying(values, share))
    return frozenset(out)
