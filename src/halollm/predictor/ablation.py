"""What dropping groups costs, end to end: run a text through the model with the k groups of
every layer half ranked lowest by some method zeroed per token, and compare the logits with
the full model's (KL, top-1 agreement, perplexity).

Methods rank the groups of one layer half for each token (higher = keep):
``oracle`` (the true significance, measured on the spot), ``predicted`` (the predictor, on the
same input the layer sees), ``static`` (the calibrated mean significance, one order for every
token) and ``random``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from halollm.groups import Kind
from halollm.metrics import kl_per_position, token_nll, top1_match
from halollm.predictor.net import HalfPredictor
from halollm.predictor.signals import GroupedModel, Signals, significance

# (layer, kind, input [T, d], true significance [T, G]) -> scores [T, G], higher = keep
Ranker = Callable[[int, Kind, torch.Tensor, torch.Tensor], torch.Tensor]


def oracle() -> Ranker:
    return lambda layer, kind, x, sig: sig


def predicted(nets: dict[Kind, HalfPredictor]) -> Ranker:
    return lambda layer, kind, x, sig: nets[kind].scores(layer, x)


def static(mean_sig: dict[Kind, torch.Tensor]) -> Ranker:
    """mean_sig[kind]: [L, G] calibrated mean significance."""
    return lambda layer, kind, x, sig: mean_sig[kind][layer].expand_as(sig)


def random(seed: int = 0) -> Ranker:
    gen = torch.Generator().manual_seed(seed)
    return lambda layer, kind, x, sig: torch.rand(sig.shape, generator=gen)


def dropped_count(fraction: float, groups: int) -> int:
    """Groups dropped per layer half for a fraction: rounded, at least one if fraction > 0,
    never all of them."""
    if fraction <= 0:
        return 0
    return min(groups - 1, max(1, round(fraction * groups)))


# (layer, kind, input [T, d], true significance [T, G]) -> groups kept [T, G] (None: all)
Masker = Callable[[int, Kind, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def drop_lowest(ranker: Ranker, drop: dict[Kind, int]) -> Masker:
    """Drop, per token, the drop[kind] groups the ranker scores lowest."""
    def mask(layer: int, kind: Kind, x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor | None:
        k = drop.get(kind, 0)
        if not k:
            return None
        keep = torch.ones_like(sig, dtype=torch.bool)
        keep.scatter_(1, ranker(layer, kind, x, sig).topk(k, dim=1, largest=False).indices,
                      False)
        return keep
    return mask


@torch.inference_mode()
def forward_masked(gm: GroupedModel, ids: Sequence[int], masker: Masker | None) -> torch.Tensor:
    """Logits [T, vocab] of one causal sequence, each layer half summing only the groups
    `masker` keeps for each token."""
    def keep(i: int, kind: Kind, x: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        mask = None if masker is None else masker(i, kind, x, significance(parts))
        return parts if mask is None else parts * mask.T[..., None]

    h = gm.hidden(ids, keep)
    return gm.model.logits(h)


def compare(logits: torch.Tensor, full: torch.Tensor, ids: Sequence[int]) -> dict[str, float]:
    """Sums over positions (divide by the count): KL(full || logits), top-1 agreement, and the
    next-token negative log-likelihood under `logits`."""
    kl = kl_per_position(logits, full)
    agree = top1_match(logits, full).float()
    nll = token_nll(logits[:-1], list(ids[1:]))
    return {"kl": float(kl.sum()), "agreement": float(agree.sum()), "nll": float(nll.sum()),
            "positions": logits.shape[0], "predictions": len(ids) - 1}


def summarise(total: dict[str, float]) -> dict[str, float]:
    n, m = max(total["positions"], 1), max(total["predictions"], 1)
    return {"kl": round(total["kl"] / n, 5), "agreement": round(total["agreement"] / n, 4),
            "ppl": round(math.exp(total["nll"] / m), 3)}


def ablate(gm: GroupedModel, chunks: Sequence[Sequence[int]], rankers: dict[str, Ranker],
           fractions: Sequence[float], kinds: Sequence[Kind] = ("mlp",),
           progress: Callable[[], None] | None = None) -> dict[str, dict[str, dict]]:
    """{fraction: {method: {kl, agreement, ppl, dropped_per_layer}}} plus the full model's
    perplexity under key "full"."""
    full = [forward_masked(gm, ids, None) for ids in chunks]
    out: dict[str, dict[str, dict]] = {}
    base: dict[str, float] = {}
    for ids, logits in zip(chunks, full, strict=True):
        _accumulate(base, compare(logits, logits, ids))
    out["full"] = {"model": summarise(base)}
    for frac in fractions:
        drop = {kind: dropped_count(frac, gm.partition.count(0, kind)) for kind in kinds}
        row: dict[str, dict] = {}
        for name, ranker in rankers.items():
            total: dict[str, float] = {}
            for ids, ref in zip(chunks, full, strict=True):
                _accumulate(total, compare(forward_masked(gm, ids, drop_lowest(ranker, drop)),
                                            ref, ids))
            row[name] = {**summarise(total), "dropped_per_layer": dict(drop)}
            if progress is not None:
                progress()
        out[f"{frac:g}"] = row
    return out


def _accumulate(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


def ranking_quality(net: HalfPredictor, signals: Signals, kind: Kind, n_layers: int,
                    top: float = 0.25) -> dict[str, float]:
    """On held-out signals: recall of the truly most significant `top` share of groups among
    the predicted ones, Spearman rank correlation, and the share of the true significance
    the predictor ranks in its top `top` (vs the oracle's share)."""
    x = torch.stack([signals.x[(i, kind)] for i in range(n_layers)])
    sig = torch.stack([signals.sig[(i, kind)] for i in range(n_layers)])
    scores = net.scores_all(x)
    G = sig.shape[-1]
    k = max(1, round(top * G))
    true_top = sig.topk(k, dim=-1).indices
    pred_top = scores.topk(k, dim=-1).indices
    hit = (true_top[..., :, None] == pred_top[..., None, :]).any(-1).float().mean()
    spearman = _spearman(scores, sig) if G > 2 else float("nan")
    total = sig.sum(-1)
    share_pred = sig.gather(-1, pred_top).sum(-1) / total
    share_oracle = sig.gather(-1, true_top).sum(-1) / total
    return {"recall_top": round(float(hit), 4), "top_fraction": top,
            "spearman": round(spearman, 4),
            "share_in_predicted_top": round(float(share_pred.mean()), 4),
            "share_in_true_top": round(float(share_oracle.mean()), 4)}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort(-1).argsort(-1).float()
    rb = b.argsort(-1).argsort(-1).float()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    rho = (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp(min=1e-12)
    return float(rho.mean())
