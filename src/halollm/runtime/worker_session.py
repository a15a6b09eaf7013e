"""A worker's state for one coordinator session: the shards of its plan (resident, or
streamed through a group store when the plan exceeds its memory budget) and which cached
positions of each layer it knows."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from halollm.errors import HaloError
from halollm.groups import GroupId
from halollm.loader.store import GroupStore
from halollm.loader.weights import (
    GroupWeights,
    attention_shard,
    group_nbytes,
    mlp_shard,
    read_group,
)
from halollm.model.config import ModelConfig
from halollm.model.llama import AttentionShard, MlpShard, Rope
from halollm.model.loader import ModelSource

Units = tuple[int, ...]


@dataclass
class LayerWork:
    attn_groups: Units = ()
    mlp_groups: Units = ()
    attn: AttentionShard | None = None
    mlp: MlpShard | None = None
    mlp_units: Units = ()  # streamed: the MLP neurons, weights in the store


@dataclass
class Session:
    session: int
    identity: bytes  # the coordinator's ZeroMQ identity on our ROUTER
    udp_addr: tuple[str, int]
    device: int = -1
    epoch: int = -1
    wire: int = 1
    dtype: torch.dtype = torch.float16
    layers: list[LayerWork] = field(default_factory=list)
    store: GroupStore | None = None  # the plan exceeds the memory budget: weights streamed
    request: int = -1
    known: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> filled positions
    asked: dict[int, set[int]] = field(default_factory=dict)  # layer -> positions requested
    last_heard: float = field(default_factory=time.monotonic)

    def start_request(self, request: int) -> None:
        """A new request: no cached position is known any more."""
        self.request, self.known, self.asked = request, {}, {}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def known_upto(self, layer: int, upto: int) -> torch.Tensor:
        known = self.known.get(layer)
        if known is None or known.shape[0] < upto:
            grown = torch.zeros(max(upto, 256, 2 * (0 if known is None else known.shape[0])),
                                dtype=torch.bool)
            if known is not None:
                grown[: known.shape[0]] = known
            self.known[layer] = known = grown
        return known

    def mark_known(self, layer: int, start: int, n: int) -> None:
        self.known_upto(layer, start + n)[start:start + n] = True

    def attention(self, layer: int) -> AttentionShard:
        """The layer's attention shard with its weights (from the store when streaming)."""
        shard = self.layers[layer].attn
        assert shard is not None
        if self.store is not None:
            return shard.with_weights(self.store.get(GroupId(layer, "attn", 0)).tensors)
        return shard

    def mlp(self, layer: int) -> MlpShard | None:
        work = self.layers[layer]
        if work.mlp is None and work.mlp_units and self.store is not None:
            return MlpShard.of(work.mlp_units, *self.store.get(GroupId(layer, "mlp", 0)).tensors)
        return work.mlp


def parse_layers(text: str, config: ModelConfig) -> list[tuple[Units, Units, Units, Units]]:
    """A plan's layers: per layer (attention groups, attention units, MLP groups, MLP units),
    checked against the model (a unit or a layer it does not have is a HaloError)."""
    try:
        specs = json.loads(text)
        out = [(tuple(map(int, s["attn"]["groups"])), tuple(map(int, s["attn"]["units"])),
                tuple(map(int, s["mlp"]["groups"])), tuple(map(int, s["mlp"]["units"])))
               for s in specs]
    except (ValueError, TypeError, KeyError) as exc:
        raise HaloError(f"malformed plan: {exc}") from exc
    if len(out) != config.n_layers:
        raise HaloError(f"plan has {len(out)} layers, the model {config.n_layers}")
    for _, attn, _, mlp in out:
        if any(not 0 <= u < config.n_kv_heads for u in attn) or \
                any(not 0 <= u < config.intermediate_size for u in mlp):
            raise HaloError("plan names a unit the model does not have")
    return out


def plan_sizes(config: ModelConfig, layers: list[tuple[Units, Units, Units, Units]],
               dtype: torch.dtype) -> dict[GroupId, int]:
    """Bytes of this device's share of every layer half (a store key)."""
    out: dict[GroupId, int] = {}
    for i, (_, attn, _, mlp) in enumerate(layers):
        for kind, share in (("attn", attn), ("mlp", mlp)):
            if share:
                out[GroupId(i, kind, 0)] = group_nbytes(config, kind, len(share), dtype)
    return out


def build_layers(source: ModelSource, rope: Rope, s: Session,
                 layers: list[tuple[Units, Units, Units, Units]], dtype: torch.dtype,
                 stream: bool) -> list[LayerWork]:
    """The shards of a plan, keeping those of the previous plan that did not change (their
    KV caches included); a layer whose attention changed forgets what it knew."""
    config = source.config
    keep = s.dtype == dtype and len(s.layers) == len(layers)
    out = []
    for i, (attn_groups, attn_units, mlp_groups, mlp_units) in enumerate(layers):
        old = s.layers[i] if keep else LayerWork()
        work = LayerWork(attn_groups, mlp_groups)
        if attn_units:
            same = old.attn is not None and old.attn.kv_heads == attn_units and \
                old.attn.streamed == stream
            if same:
                work.attn = old.attn
            elif stream:
                work.attn = AttentionShard.without_weights(config, attn_units, rope)
            else:
                work.attn = attention_shard(source, config, i, attn_units, dtype, rope)
            if not same:
                s.known.pop(i, None)
        if mlp_units and stream:
            work.mlp_units = mlp_units
        elif mlp_units:
            same = old.mlp is not None and old.mlp.neurons == mlp_units
            work.mlp = old.mlp if same else mlp_shard(source, i, mlp_units, dtype)
        out.append(work)
    return out


def group_reader(source: ModelSource, layers: list[tuple[Units, Units, Units, Units]],
                 dtype: torch.dtype) -> Callable[[GroupId], GroupWeights]:
    def read(gid: GroupId) -> GroupWeights:
        _, attn, _, mlp = layers[gid.layer]
        return read_group(source, source.config, gid.layer, gid.kind,
                          mlp if gid.kind == "mlp" else attn, dtype)

    return read
