"""A single-device decoder whose group weights live in a GroupStore under a memory budget.

Resident always: the embedding, the output head, the norms and the KV caches (the stated
overhead). Streamed: every attention and MLP group. In a packed format the store holds the
group's packed bytes, read from the group cache (``group_cache``: packed once per model,
format and partition; loading is a read of those bytes); in a float format a group is read
from the memory-mapped model file (only its rows and column blocks) and dequantized. The
groups of a layer half are computed one by one and their partial updates summed in float32,
exactly as the distributed runtime sums the devices' partials.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from halollm.errors import HaloError
from halollm.groups import KINDS, GroupId, Partition
from halollm.loader.group_cache import GroupCache, cache_key, cache_path, model_hash
from halollm.loader.store import GroupStore
from halollm.loader.weights import GroupWeights, group_nbytes, read_group
from halollm.model.formats import WeightFormat, Weights
from halollm.model.llama import AttentionShard, Half, Layer, MlpShard, Transformer, sum_partials

# MLP groups per layer, None: 1 in strict mode (one group per layer half: the fewest kernel
# calls and loads per token; measured 13 ms/token less than 4 groups at a 50% budget on the
# 135M model, docs/loader.md), RELAXED_MLP_GROUPS with --critical-share (relaxed loading
# leaves out some of a layer's MLP groups, so it needs several).
DEFAULT_MLP_GROUPS: int | None = None
RELAXED_MLP_GROUPS = 4


def parse_budget(text: str, model_bytes: int) -> int:
    """'512M', '1.5G', '25%' (of the model's group weights) -> bytes."""
    from halollm.units import parse_bytes

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", text)
    if m:
        share = float(m.group(1)) / 100
        if not 0 < share:
            raise HaloError(f"a memory budget must be positive (got {text!r})")
        return int(share * model_bytes)
    return parse_bytes(text)


class StreamedDecoder:
    """generate.Decoder over a GroupStore."""

    def __init__(self, source: Any, fmt: WeightFormat | torch.dtype, budget: str | int,
                 policy: str = "prefetch", attn_groups: int | None = 1,
                 mlp_groups: int | None = DEFAULT_MLP_GROUPS,
                 critical_share: float | None = None, group_cache: bool = True) -> None:
        """critical_share None: strict, every group is waited for. Else relaxed: per layer,
        the MLP groups carrying that share of the calibrated significance are critical
        (evicted last, always waited for); a non-critical one not resident when needed is
        left out, never waited for. Attention is always critical (it feeds the KV cache).
        (A predictor's contribution-ordered groups are not used here: their neurons are
        scattered, so reading one group's down-projection columns reads nearly the whole
        quantized tensor -- measured 3x slower than contiguous groups.)"""
        if isinstance(fmt, torch.dtype):
            fmt = WeightFormat.of_dtype(fmt)
        self.config, self.format, self.dtype, self.source = source.config, fmt, fmt.dtype, source
        if not hasattr(source, "rows"):
            raise HaloError("this model format cannot be read group by group")
        self.weights = Weights(source, fmt, partial=True)
        if mlp_groups is None:
            mlp_groups = 1 if critical_share is None else RELAXED_MLP_GROUPS
        self.partition = Partition.contiguous(self.config, attn_groups, mlp_groups)
        self.critical_share = critical_share
        self.head = Transformer(self.config, Weights(source, fmt), layers=[])
        order = [GroupId(i, kind, j) for i in range(self.config.n_layers) for kind in KINDS
                 for j in range(self.partition.count(i, kind))]
        sizes = self._resolve_budget(order, budget, {
            g: group_nbytes(self.config, g.kind, len(self.partition.units(g)), self.weights)
            for g in order})
        self.cache = self._open_cache(order) if group_cache else None
        if self.cache is not None:  # the copies the store holds: the cache's exact sizes
            sizes = self._resolve_budget(order, budget, {g: self.cache.size(g) for g in order})
        self.attn = [[AttentionShard.without_weights(self.config, self.partition.units(
            GroupId(i, "attn", j)), self.head.rope) for j in range(
            self.partition.count(i, "attn"))] for i in range(self.config.n_layers)]
        self.critical: frozenset[GroupId] = frozenset(order)
        significance: dict[GroupId, float] = {}
        if critical_share is not None:
            from halollm.model.loader import open_tokenizer
            from halollm.predictor.significance import RANKING_TEXT, cached_ranking
            from halollm.scheduler.placement import critical_groups

            significance = cached_ranking(
                model_hash(Path(source.path)), self.config, source.tensor, self.partition,
                open_tokenizer(source).encode(RANKING_TEXT))
            self.critical = critical_groups(self.partition, significance, critical_share) | {
                g for g in order if g.kind == "attn"}
        self.store = GroupStore(order, sizes, self._read, self.budget, policy, significance,
                                keep=self.critical if critical_share is not None
                                else frozenset(),
                                release=None if self.cache is None else self.cache.release)

    def _resolve_budget(self, order: list[GroupId], budget: str | int,
                        sizes: dict[GroupId, int]) -> dict[GroupId, int]:
        """Set model_bytes and budget for these group sizes; refuse a budget too small for
        one layer half. Returns `sizes`."""
        self.model_bytes = sum(sizes.values())
        self.budget = budget if isinstance(budget, int) else parse_budget(budget,
                                                                          self.model_bytes)
        need = max(sum(sizes[g] for g in order if (g.layer, g.kind) == (i, k))
                   for i in range(self.config.n_layers) for k in KINDS)
        if self.budget < need:
            raise HaloError(f"a memory budget of {_mib(self.budget)} cannot hold one layer's "
                            f"{'attention or MLP' if need else 'groups'} ({_mib(need)} in "
                            f"{self.format.name}): give at least {_mib(need)} "
                            f"({100 * need / self.model_bytes:.0f}% of the model's "
                            f"{_mib(self.model_bytes)})")
        return sizes

    def _open_cache(self, order: list[GroupId]) -> GroupCache | None:
        """The packed-group cache of this model, format and partition (built the first time),
        for packed formats of a model file; None (groups read from the model file) for float
        formats, or if the cache cannot be written (the reason is said)."""
        path = getattr(self.source, "path", None)
        if not self.format.packed or path is None:
            return None
        key = cache_key(model_hash(Path(path)), self.format.name, self.partition.to_json())
        try:
            return GroupCache.open_or_build(cache_path(key), key, order, self._read_model)
        except OSError as e:
            print(f"halo: cannot use a group cache ({e}): reading groups from the model file",
                  file=sys.stderr)
            return None

    def _read(self, gid: GroupId) -> GroupWeights:
        if self.cache is not None:
            return self.cache.load(gid)
        return self._read_model(gid)

    def _read_model(self, gid: GroupId) -> GroupWeights:
        return read_group(self.weights, self.config, gid.layer, gid.kind,
                          tuple(self.partition.units(gid)))

    @torch.inference_mode()
    def forward_last(self, ids: Sequence[int], start: int) -> torch.Tensor:
        s = self.store.stats
        before = (s.hits, s.misses, s.bytes_loaded, s.stall_ms, s.skipped)
        t0 = time.perf_counter()
        h = self.head.hidden(list(ids), start, reduce=self._reduce)
        s.per_token.append({"pos": start, "hits": s.hits - before[0],
                            "misses": s.misses - before[1],
                            "skipped": s.skipped - before[4],
                            "bytes_loaded": s.bytes_loaded - before[2],
                            "stall_ms": round(s.stall_ms - before[3], 3),
                            "ms": round(1e3 * (time.perf_counter() - t0), 3)})
        return self.head.logits(h[-1:])[-1]

    def _reduce(self, i: int, half: Half, _layer: Layer, x: torch.Tensor, start: int
                ) -> torch.Tensor:
        """A layer half from the store, group by group, summed in float32."""
        parts = []
        if half == "attn":
            for j, shard in enumerate(self.attn[i]):
                w = self.store.get(GroupId(i, "attn", j))
                parts.append(shard.with_weights(w.tensors).forward(x, start))
        else:
            needed = self._needed(i, x.shape[0])
            for j in range(self.partition.count(i, "mlp")):
                gid = GroupId(i, "mlp", j)
                w = self.store.get(gid) if needed[j] else self.store.get_if_resident(gid)
                if w is not None:
                    parts.append(MlpShard.of(self.partition.units(gid), *w.tensors  # type: ignore[arg-type]
                                             ).forward(x))
        return sum_partials(parts) if parts else torch.zeros(x.shape[0], x.shape[1])

    def _needed(self, layer: int, ntok: int) -> list[bool]:
        """Which MLP groups of this layer must be waited for: all in strict mode and for a
        prompt (its hidden states feed every later token); else the critical ones."""
        n = self.partition.count(layer, "mlp")
        if self.critical_share is None or ntok > 1:
            return [True] * n
        return [GroupId(layer, "mlp", j) in self.critical for j in range(n)]

    def weight_bytes(self) -> int:
        """Resident weight bytes now: the head, embedding and norms, and the store's groups."""
        return self.head.weight_bytes() + sum(
            w.nbytes for w in list(self.store.resident.values()))

    def loader_json(self) -> dict[str, Any]:
        return {"policy": self.store.policy, "budget_bytes": self.budget,
                "weights": self.format.name,
                "critical_groups": len(self.critical),
                "model_group_bytes": self.model_bytes, **self.store.stats.to_json()}

    def close(self) -> None:
        self.store.close()
        if self.cache is not None:
            self.cache.close()


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM), from /proc."""
    return _status_kib("VmHWM") * 1024


def rss_anon_bytes() -> int:
    """Anonymous resident memory now (what dequantized weights occupy; file pages of the
    memory-mapped model are not in it)."""
    return _status_kib("RssAnon") * 1024


def _status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
