"""What the coordinator computes itself: the shards of its own groups (rebuilt where a new
placement changed them, attention caches refilled from the token history), the fallback
shards of critical MLP contributions that missed the deadline, and per-token criticality."""

from __future__ import annotations

import time

import numpy as np
import torch

from halollm.groups import GroupId
from halollm.loader.weights import attention_shard, mlp_shard
from halollm.model.formats import Weights, nbytes
from halollm.model.llama import MlpShard, Transformer
from halollm.model.loader import ModelSource
from halollm.predictor.critical import SharePredictor, critical_devices
from halollm.runtime.history import History
from halollm.runtime.links import WorkerLink
from halollm.runtime.protocol import RoundTag
from halollm.runtime.stats import SyncStats
from halollm.scheduler.placement import COORDINATOR, Placement

HALVES = ("attn", "mlp")


def _units(shard: object) -> tuple[int, ...]:
    return tuple(getattr(shard, "kv_heads", None) or shard.neurons)  # type: ignore[attr-defined]


class OwnShare:
    def __init__(self, source: ModelSource, model: Transformer, weights: Weights,
                 stats: SyncStats) -> None:
        """`weights`: the coordinator's format, read group by group from `source` (the
        same format every worker uses, so own and fallback shards equal theirs)."""
        self.source, self.model, self.stats = source, model, stats
        self.weights, self.dtype = weights, weights.format.dtype
        self.config = source.config
        self._fallback: dict[tuple[int, int], MlpShard] = {}

    def apply(self, placement: Placement, history: History) -> None:
        """Make the coordinator's shards compute exactly its units of `placement`: shards
        whose units it still holds stay (KV caches and all); the units not covered by them
        get one new shard (attention: keys and values rebuilt from the history)."""
        for i, layer in enumerate(self.model.layers):
            for half in HALVES:
                want = placement.units_of(COORDINATOR, i, half)
                wanted = set(want)
                keep = [s for s in getattr(layer, half) if set(_units(s)) <= wanted]
                have = {u for s in keep for u in _units(s)}
                rest = tuple(u for u in want if u not in have)
                if rest:
                    keep.append(self._build(i, half, rest, history))
                setattr(layer, half, keep)
        # fallback shards stay where the worker's units did (prepare_fallbacks builds the rest)
        self._fallback = {(w, i): s for (w, i), s in self._fallback.items()
                          if placement.units_of(w, i, "mlp") == s.neurons}

    def _build(self, layer: int, half: str, units: tuple[int, ...], history: History
               ) -> object:
        if half == "mlp":
            return mlp_shard(self.weights, layer, units)
        shard = attention_shard(self.weights, self.config, layer, units, self.model.rope)
        if history.length[layer]:
            shard.fill_cache(history.all_rows(layer).to(self.dtype), 0)
        return shard

    def prepare_fallbacks(self, placement: Placement, links: list[WorkerLink],
                          budget_bytes: int) -> int:
        """Build, ahead of need, the fallback shards of the workers' MLP units (any may be
        critical: in a prompt round every one is), layer by layer, while they fit
        `budget_bytes`; returns how many were built. A shard built
        at the deadline costs hundreds of forwards (reading and packing the weights: 70-90
        ms of CPU for a third of a 1024-wide layer, 0.2 ms to compute it), which turned a
        worker's late partial into a stall of 0.3 s at a quarter core."""
        used, built = 0, 0
        for layer in range(self.config.n_layers):
            for link in links:
                units = placement.units_of(link.index, layer, "mlp")
                if not units or (link.index, layer) in self._fallback:
                    continue
                shard = mlp_shard(self.weights, layer, units)
                size = nbytes(shard.w_gate_up) + nbytes(shard.w_down)
                if used + size > budget_bytes:
                    return built
                self._fallback[(link.index, layer)] = shard
                used, built = used + size, built + 1
        return built

    def fallback(self, placement: Placement, link: WorkerLink, tag: RoundTag,
                 x: torch.Tensor) -> torch.Tensor:
        """A critical MLP contribution missing at the deadline, computed from the
        memory-mapped weights (the worker's shard for this layer: prepared with the plan
        where memory allowed, else built at its first use)."""
        key = (link.index, tag.layer)
        shard = self._fallback.get(key)
        if shard is None:
            units = placement.units_of(link.index, tag.layer, "mlp")
            shard = self._fallback[key] = mlp_shard(self.weights, tag.layer, units)
            self.stats.fallback_builds += 1
        self.stats.fallbacks += 1
        return shard.forward(x)


class Criticality:
    """Per token: the workers holding a group among the smallest set that carries
    `share` of the predicted significance (with a predictor), else the static plan's
    critical groups. Called only for rounds with something missing at the deadline."""

    def __init__(self, predictors: dict[str, SharePredictor] | None, share: float,
                 stats: SyncStats) -> None:
        self.predictors, self.share, self.stats = predictors, share, stats
        self.placement: Placement | None = None
        self._owner: dict[tuple[int, str], np.ndarray] = {}

    def set_placement(self, placement: Placement) -> None:
        self.placement = placement
        self._owner.clear()

    def __call__(self, layer: int, half: str, x: torch.Tensor, targets: list[WorkerLink]
                 ) -> set[int]:
        p = self.placement
        assert p is not None
        if self.predictors is None:
            return {t.index for t in targets if p.is_critical(t.index, layer, half)}  # type: ignore[arg-type]
        if self.share <= 0:
            return set()
        t0 = time.perf_counter()
        shares = self.predictors[half].shares(layer, x)
        owner = self._owner.get((layer, half))
        if owner is None:
            owner = self._owner[(layer, half)] = np.array(
                [p.owner[GroupId(layer, half, j)]  # type: ignore[arg-type]
                 for j in range(shares.shape[-1])])
        devices = critical_devices(shares, self.share, owner)
        self.stats.predict_ms += 1e3 * (time.perf_counter() - t0)
        self.stats.predictions += 1
        return {t.index for t in targets if t.index in devices}
