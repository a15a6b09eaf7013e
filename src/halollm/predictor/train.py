"""Fitting the predictor to calibration signals.

Target: each group's share of its layer half's significance for this token (a distribution
over groups). Loss: cross-entropy between that share and softmax(scores), which is scale-free
(a layer with large updates does not dominate) and rewards getting the big groups right — the
ones a wrong "insignificant" call would cost most.

Memory: `record` keeps each token's layer inputs in one byte per value (float8 e4m3 of the
input standardised by the first sequence's per-feature mean and spread: ~2% relative error)
and shares in fp16, in buffers allocated once (nothing grows per token, nothing is copied
before training). When even that exceeds the budget it keeps a random sample of tokens;
every token's significance still counts towards the static ranking. A half with one group
(attention, by default) has nothing to predict and records no inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from halollm.groups import KINDS, Kind
from halollm.predictor.net import HalfPredictor
from halollm.predictor.signals import GroupedModel, significance

RECORD_BYTES = 256 << 20  # default budget for the recorded inputs and shares: 14,716 tokens of
# SmolLM2-135M (90% of the default 16384; all of them cost +32 MB of peak memory)
STORED = torch.float8_e4m3fn  # recorded inputs: standardised, one byte per value


@dataclass
class TrainingSet:
    """Per trained half: the normalised inputs of M sampled tokens, stored as
    z = (x - center) / scale [L, M, d] (STORED dtype; center, scale [L, 1, d] from the first
    sequence), and their true shares [L, M, G] (fp16). Per half: every group's significance
    summed over all N calibration tokens [L, G] (the static ranking)."""

    x: dict[Kind, torch.Tensor]
    share: dict[Kind, torch.Tensor]
    center: dict[Kind, torch.Tensor]
    scale: dict[Kind, torch.Tensor]
    sig_sum: dict[Kind, torch.Tensor]
    tokens: int

    @property
    def sampled(self) -> int:
        return next(iter(self.x.values())).shape[1] if self.x else 0

    def inputs(self, kind: Kind) -> torch.Tensor:
        """[L, M, d] float32: the recorded inputs decoded (within float8's ~6% per value)."""
        return self.x[kind].float() * self.scale[kind] + self.center[kind]

    def static(self, kind: Kind) -> torch.Tensor:
        """[L, G] mean significance of every group over all calibration tokens."""
        return (self.sig_sum[kind] / max(self.tokens, 1)).float()


def trained_kinds(gm: GroupedModel) -> list[Kind]:
    """The halves whose groups need a predictor: those with more than one group."""
    return [k for k in KINDS if gm.partition.count(0, k) > 1]


def sample_size(gm: GroupedModel, budget: int = RECORD_BYTES) -> int:
    """How many tokens' inputs fit `budget` bytes (stored inputs plus fp16 shares)."""
    cfg = gm.config
    per_token = sum(cfg.n_layers * (STORED.itemsize * cfg.hidden_size
                                    + 2 * gm.partition.count(0, k))
                    for k in trained_kinds(gm))
    return budget // max(per_token, 1)


@torch.no_grad()
def record(gm: GroupedModel, chunks: Sequence[list[int]], sample: int, seed: int = 0,
           progress: Callable[[int], None] | None = None) -> TrainingSet:
    """Run every chunk (one causal sequence each) through the model; keep the inputs and
    shares of `sample` tokens drawn uniformly without replacement, and every token's
    significance sum."""
    n_layers, dim = gm.config.n_layers, gm.config.hidden_size
    n = sum(len(c) for c in chunks)
    m = min(sample, n)
    picked = torch.zeros(n, dtype=torch.bool)
    picked[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]] = True
    groups = {k: gm.partition.count(0, k) for k in KINDS}
    kinds = trained_kinds(gm)
    x = {k: torch.empty(n_layers, m, dim, dtype=STORED) for k in kinds}
    share = {k: torch.empty(n_layers, m, groups[k], dtype=torch.float16) for k in kinds}
    center = {k: torch.zeros(n_layers, 1, dim) for k in kinds}
    scale = {k: torch.ones(n_layers, 1, dim) for k in kinds}
    sig_sum = {k: torch.zeros(n_layers, groups[k], dtype=torch.float64) for k in KINDS}
    start = offset = 0
    for first, ids in zip([True] + [False] * (len(chunks) - 1), chunks, strict=True):
        rows = picked[start:start + len(ids)].nonzero().squeeze(1)
        span = slice(offset, offset + len(rows))

        def keep(i: int, kind: Kind, xin: torch.Tensor, parts: torch.Tensor,
                 rows: torch.Tensor = rows, span: slice = span, first: bool = first
                 ) -> torch.Tensor:
            sig = significance(parts)
            sig_sum[kind][i] += sig.sum(0, dtype=torch.float64)
            if kind in x and first:
                center[kind][i] = xin.mean(0)
                scale[kind][i] = xin.std(0).clamp(min=1e-4) if len(xin) > 1 else 1.0
            if kind in x and len(rows):
                x[kind][i, span] = ((xin[rows] - center[kind][i]) / scale[kind][i]).to(STORED)
                s = sig[rows]
                share[kind][i, span] = s / s.sum(-1, keepdim=True).clamp(min=1e-12)
            return parts

        gm.hidden(ids, keep)
        start, offset = start + len(ids), offset + len(rows)
        if progress is not None:
            progress(len(ids))
    return TrainingSet(x, share, center, scale, sig_sum, n)


def moments(x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and feature mean and std of x [L, N, d], in float64 chunks of tokens."""
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


def untrained(n_layers: int, dim: int, rank: int, groups: int, seed: int = 0) -> HalfPredictor:
    """A network for a half with nothing to learn (one group: its share is always 1)."""
    return HalfPredictor.init(n_layers, dim, rank, groups, torch.Generator().manual_seed(seed))


def fit_half(x: torch.Tensor, share: torch.Tensor, rank: int = 64, epochs: int = 30,
             batch: int = 512, lr: float = 3e-3, seed: int = 0,
             progress: Callable[[int, float], None] | None = None,
             center: torch.Tensor | None = None, scale: torch.Tensor | None = None
             ) -> HalfPredictor:
    """Train every layer's predictor of one half together (batched over layers) on inputs
    [L, N, d] (stored as (x - center) / scale when those [L, 1, d] are given) and true shares
    [L, N, G]. The returned network takes raw inputs x."""
    mean, std = moments(x)
    gen = torch.Generator().manual_seed(seed)
    net = HalfPredictor.init(x.shape[0], x.shape[-1], rank, share.shape[-1], gen)
    params = net.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    n = x.shape[1]
    per_epoch = max(1, n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    with torch.enable_grad():
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for k in range(per_epoch):
                idx = order[k * batch:(k + 1) * batch]
                xb = (x[:, idx].float() - mean[:, None]) / std[:, None]
                logp = net.scores_all(xb).log_softmax(-1)
                loss = -(share[:, idx].float() * logp).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
            if progress is not None:
                progress(epoch, total / per_epoch)
    for p in params:
        p.requires_grad_(False)
    if center is not None and scale is not None:  # x = center + scale * z
        mean, std = center[:, 0] + scale[:, 0] * mean, scale[:, 0] * std
    return net.folded(mean, std)
