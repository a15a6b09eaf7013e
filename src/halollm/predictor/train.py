"""Fitting the predictor to calibration signals.

Target: each group's share of its layer half's significance for this token (a distribution
over groups). Loss: cross-entropy between that share and softmax(scores), which is scale-free
(a layer with large updates does not dominate) and rewards getting the big groups right — the
ones a wrong "insignificant" call would cost most.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from halollm.groups import Kind
from halollm.predictor.net import HalfPredictor
from halollm.predictor.signals import Signals


def stacked(signals: Signals, kind: Kind, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [L, N, d] as stored (fp16), share [L, N, G])."""
    x = torch.stack([signals.x[(i, kind)] for i in range(n_layers)])
    sig = torch.stack([signals.sig[(i, kind)] for i in range(n_layers)])
    return x, sig / sig.sum(-1, keepdim=True).clamp(min=1e-12)


def moments(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and feature mean and std of x [L, N, d], in float32 chunks."""
    total = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    square = torch.zeros_like(total)
    for k in range(0, x.shape[1], chunk):
        part = x[:, k:k + chunk].double()
        total += part.sum(1)
        square += part.pow(2).sum(1)
    n = x.shape[1]
    mean = total / n
    var = (square / n - mean.pow(2)).clamp(min=0)
    return mean.float(), var.sqrt().float().clamp(min=1e-4)


def fit_half(signals: Signals, kind: Kind, n_layers: int, rank: int = 64, epochs: int = 30,
             batch: int = 512, lr: float = 3e-3, seed: int = 0,
             progress: Callable[[int, float], None] | None = None) -> HalfPredictor:
    """Train every layer's predictor of one half together (batched over layers)."""
    x, share = stacked(signals, kind, n_layers)
    mean, std = moments(x)
    gen = torch.Generator().manual_seed(seed)
    net = HalfPredictor.init(n_layers, x.shape[-1], rank, share.shape[-1], gen)
    params = net.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    n = x.shape[1]
    steps = epochs * max(1, n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    step = 0
    with torch.enable_grad():
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for k in range(max(1, n // batch)):
                idx = order[k * batch:(k + 1) * batch]
                xb = (x[:, idx].float() - mean[:, None]) / std[:, None]
                logp = net.scores_all(xb).log_softmax(-1)
                loss = -(share[:, idx] * logp).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                total += float(loss.detach())
            if progress is not None:
                progress(epoch, total / max(1, n // batch))
    for p in params:
        p.requires_grad_(False)
    return net.folded(mean, std)
