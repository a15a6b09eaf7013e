"""A worker's state for one coordinator session: the shards of its plan (resident, or
streamed through a group store when the plan exceeds its memory budget) and which cached
positions of each layer it knows."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from halollm.errors import HaloError
from halollm.groups import GroupId
from halollm.loader.store import GroupStore
from halollm.loader.streamed import peak_rss_bytes
from halollm.loader.weights import (
    GroupWeights,
    attention_shard,
    group_nbytes,
    mlp_shard,
    read_group,
)
from halollm.model.config import ModelConfig
from halollm.model.formats import Matrix, WeightFormat, Weights, nbytes
from halollm.model.llama import AttentionShard, MlpShard, Rope
from halollm.runtime.handshake import LinkChannels
from halollm.runtime.messages import Kv, Plan

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
    link: LinkChannels  # this session's control and data channels (the worker's end)
    fd: int | None = None  # the coordinator's connection, to notice it close
    device: int = -1
    epoch: int = -1
    wire: int = 1
    dtype: torch.dtype = torch.float16  # of activations
    format: WeightFormat | None = None  # of the weights of the current plan
    layers: list[LayerWork] = field(default_factory=list)
    head: Matrix | None = None  # the LM head's rows this device computes (`--head workers`)
    head_span: tuple[int, int] = (0, 0)  # ... the first of them, and how many
    store: GroupStore | None = None  # the plan exceeds the memory budget: weights streamed
    request: int = -1
    known: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> filled positions
    prefix: dict[int, int] = field(default_factory=dict)  # layer -> leading positions filled
    asked: dict[int, set[int]] = field(default_factory=dict)  # layer -> positions requested
    last_heard: float = field(default_factory=time.monotonic)

    def start_request(self, request: int) -> None:
        """A new request: no cached position is known any more."""
        self.request, self.known, self.prefix, self.asked = request, {}, {}, {}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def weight_bytes(self) -> int:
        """Resident bytes of this plan's weights: resident shards and the store's groups."""
        total = 0
        for work in self.layers:
            if work.attn is not None and not work.attn.streamed:
                total += sum(nbytes(m) for m in (work.attn.w_qkv, work.attn.b_qkv,
                                                 work.attn.w_o))
            if work.mlp is not None:
                total += nbytes(work.mlp.w_gate_up) + nbytes(work.mlp.w_down)
        if self.store is not None:
            total += sum(w.nbytes for w in list(self.store.resident.values()))
        return total + nbytes(self.head)

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
        if start <= self.prefix.get(layer, 0):
            self.prefix[layer] = max(self.prefix.get(layer, 0), start + n)

    def forget(self, layer: int) -> None:
        """The layer's cache starts again (its attention shard changed)."""
        self.known.pop(layer, None)
        self.prefix.pop(layer, None)

    def fill_kv(self, m: Kv, x: torch.Tensor) -> bool:
        """Fill the layer's cache at m's positions with keys/values of inputs x (a repair
        of this request, or a replay that starts one). False if it does not apply."""
        if m.request != self.request:
            if not m.replay:
                return False
            self.start_request(m.request)
        if not 0 <= m.layer < len(self.layers) or self.layers[m.layer].attn is None \
                or m.start < 0:
            return False
        with torch.inference_mode():
            self.attention(m.layer).fill_cache(x.to(self.dtype), m.start)
        self.mark_known(m.layer, m.start, m.n)
        return True

    def key_mask(self, layer: int, pos: int, ntok: int) -> tuple[torch.Tensor | None, list[int]]:
        """(None when every earlier position is in the cache, else a mask hiding the missing
        ones; the missing positions not asked for before, now marked asked: KV repair)."""
        if pos <= self.prefix.get(layer, 0):  # the usual case, without a tensor op
            return None, []
        known = self.known_upto(layer, pos + ntok)
        if bool(known[:pos].all()):
            self.prefix[layer] = pos
            return None, []
        asked = self.asked.setdefault(layer, set())
        new = [p for p in (~known[:pos]).nonzero().flatten().tolist() if p not in asked]
        asked.update(new)
        mask = known.clone()
        mask[pos: pos + ntok] = True
        return mask, new

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
            return MlpShard.of(work.mlp_units,
                               *self.store.get(GroupId(layer, "mlp", 0)).tensors)  # type: ignore[arg-type]
        return work.mlp


def apply_plan(s: Session, p: Plan, source: Any, rope: Rope, memory_bytes: int,
               log: Callable[[str], None]) -> str | None:
    """Build the shards of plan `p` into session `s` (streamed from the model file when they
    exceed `memory_bytes`): None when done; the reason, when the budget cannot hold even
    one layer's share (nothing changes then). A malformed plan is a HaloError."""
    fmt = plan_format(p.dtype)  # the plan's weight format (a float dtype, or packed)
    weights = Weights(source, fmt, partial=True)
    layers = parse_layers(p.layers, source.config)
    head = head_slice(weights, s, p.head_start, p.head_rows)
    sizes = plan_sizes(source.config, layers, weights)
    stream = sum(sizes.values()) > memory_bytes
    if stream and max(sizes.values()) > memory_bytes:
        return (f"its memory budget ({memory_bytes / 2**20:.1f} MiB) cannot hold one "
                f"layer's share of the plan ({max(sizes.values()) / 2**20:.1f} MiB)")
    s.close()
    s.layers = build_layers(weights, rope, s, layers, stream)
    s.head, s.head_span = head, (p.head_start, p.head_rows)
    if stream:
        s.store = GroupStore(list(sizes), sizes, group_reader(weights, layers), memory_bytes)
        log(f"plan of {sum(sizes.values()) / 2**20:.0f} MiB exceeds the memory budget "
            f"({memory_bytes / 2**20:.0f} MiB): streaming its weights")
    s.dtype, s.format, s.device, s.epoch, s.wire = fmt.dtype, fmt, p.device, p.epoch, p.wire
    if p.request != s.request:
        s.start_request(p.request)
    return None


def plan_format(name: str) -> WeightFormat:
    """The weight format a plan names (fp32/fp16/bf16, gguf, q4, q8); else a HaloError."""
    try:
        return WeightFormat(name)
    except HaloError as exc:
        raise HaloError(f"unknown weight format {name!r} in a plan") from exc


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
               weights: Weights | torch.dtype) -> dict[GroupId, int]:
    """Bytes of this device's share of every layer half (a store key)."""
    out: dict[GroupId, int] = {}
    for i, (_, attn, _, mlp) in enumerate(layers):
        for kind, share in (("attn", attn), ("mlp", mlp)):
            if share:
                out[GroupId(i, kind, 0)] = group_nbytes(config, kind, len(share), weights)
    return out


def build_layers(weights: Weights, rope: Rope, s: Session,
                 layers: list[tuple[Units, Units, Units, Units]], stream: bool
                 ) -> list[LayerWork]:
    """The shards of a plan in its weight format (`weights`), keeping those of the previous
    plan that did not change (their KV caches included); a layer whose attention changed
    forgets what it knew."""
    config = weights.source.config  # type: ignore[union-attr]
    keep = s.format == weights.format and len(s.layers) == len(layers)
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
                work.attn = attention_shard(weights, config, i, attn_units, rope)
            if not same:
                s.forget(i)
        if mlp_units and stream:
            work.mlp_units = mlp_units
        elif mlp_units:
            same = old.mlp is not None and old.mlp.neurons == mlp_units
            work.mlp = old.mlp if same else mlp_shard(weights, i, mlp_units)
        out.append(work)
    return out


def head_slice(weights: Weights, s: Session, first: int, rows: int) -> Matrix | None:
    """Rows first.. first+rows-1 of the LM head (the embedding's, when tied) in the plan's
    format, or None for none; the previous plan's when they are the same rows."""
    config = weights.source.config  # type: ignore[union-attr]
    if rows == 0:
        return None
    if first < 0 or rows < 0 or first + rows > config.vocab_size:
        raise HaloError("plan names LM head rows the model does not have")
    if s.head is not None and s.head_span == (first, rows) and s.format == weights.format:
        return s.head
    name = "embed" if config.tie_embeddings else "lm_head"
    return weights.rows(name, np.arange(first, first + rows))[0]


def group_reader(weights: Weights, layers: list[tuple[Units, Units, Units, Units]]
                 ) -> Callable[[GroupId], GroupWeights]:
    config = weights.source.config  # type: ignore[union-attr]

    def read(gid: GroupId) -> GroupWeights:
        _, attn, _, mlp = layers[gid.layer]
        return read_group(weights, config, gid.layer, gid.kind,
                          mlp if gid.kind == "mlp" else attn)

    return read


def public_stats(stats: dict[str, Any], s: Session | None, counters: Mapping[str, int]
                 ) -> dict[str, Any]:
    """A worker's counters as its heartbeats and status file report them."""
    ms = stats["repair_ms"]
    loader = None
    if s is not None and s.store is not None:
        loader = {k: v for k, v in s.store.stats.to_json().items() if k != "per_token"}
    return {"rounds": stats["rounds"], "probes": stats["probes"],
            "repair_requests": stats["repair_requests"],
            "loader": loader, "repaired_positions": stats["repaired"],
            "repair_mean_ms": round(sum(ms) / len(ms), 3) if ms else None,
            "compute_ms": round(stats["compute_ms"], 1), "mlp_neurons": stats["mlp_neurons"],
            "mlp_ms": round(stats["mlp_ms"], 3), "datagrams": dict(counters),
            "weights": None if s is None or s.format is None else s.format.name,
            "weight_bytes": 0 if s is None else s.weight_bytes(),
            "peak_rss_bytes": peak_rss_bytes()}
