"""Per-token criticality at run time: which devices' contributions must arrive.

Runs once per layer half and token on the coordinator's critical path, so it is written for
one-row inputs in numpy (~18 µs per layer half here, against ~48 µs for the same in torch).
"""

from __future__ import annotations

import numpy as np
import torch

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


def critical_mask(shares: np.ndarray, target: float) -> np.ndarray:
    """shares [T, G] -> bool [T, G]: per token, the smallest set of groups whose shares add up
    to `target` (0: none, 1 or more: all)."""
    if target <= 0:
        return np.zeros(shares.shape, dtype=bool)
    if target >= 1:
        return np.ones(shares.shape, dtype=bool)
    order = np.argsort(-shares, axis=-1)
    ordered = np.take_along_axis(shares, order, axis=-1)
    needed = (np.cumsum(ordered, axis=-1) - ordered) < target
    out = np.zeros(shares.shape, dtype=bool)
    np.put_along_axis(out, order, needed, axis=-1)
    return out


def critical_devices(shares: np.ndarray, target: float, owner: np.ndarray) -> set[int]:
    """Devices (owner[g] = device of group g) holding a critical group for any token."""
    if shares.shape[0] == 1 and 0 < target < 1:  # decoding: one token, the hot path
        row = shares[0]
        order = np.argsort(-row)
        needed = int(np.searchsorted(np.cumsum(row[order]), target)) + 1
        return set(owner[order[:needed]].tolist())
    return set(owner[critical_mask(shares, target).any(axis=0)].tolist())
