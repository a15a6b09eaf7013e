"""Neuron groups: the unit of work HALO places, predicts, loads and may lose.

Every decoder layer is split into two halves, each a sum of independent partial residual
updates:

* **attention groups** own one or more KV heads, together with the query heads that read them
  (grouped-query attention) and the matching columns of the output projection;
* **MLP groups** own a set of intermediate neurons (rows of gate/up, columns of down), any size,
  not necessarily contiguous.

``h + attn(h) = h + sum_g attn_g(h)`` and ``h + mlp(h) = h + sum_g mlp_g(h)`` exactly (up to
float rounding). A group is named by ``GroupId(layer, kind, index)``; its units (KV-head or
neuron indices) come from the ``Partition``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from halollm.errors import HaloError
from halollm.model.config import ModelConfig

Kind = Literal["attn", "mlp"]
KINDS: tuple[Kind, Kind] = ("attn", "mlp")


MLP_GROUPS = 16  # MLP groups per layer unless asked otherwise


@dataclass(frozen=True, order=True)
class GroupId:
    layer: int
    kind: Kind
    index: int

    def __str__(self) -> str:
        return f"{self.layer}.{self.kind}.{self.index}"

    @classmethod
    def parse(cls, text: str) -> GroupId:
        layer, kind, index = text.split(".")
        if kind not in KINDS:
            raise ValueError(f"bad group kind in {text!r}")
        return cls(int(layer), kind, int(index))  # type: ignore[arg-type]


Units = tuple[int, ...]


@dataclass(frozen=True)
class LayerGroups:
    """The groups of one layer: KV-head sets (attention) and neuron sets (MLP)."""

    attn: tuple[Units, ...]
    mlp: tuple[Units, ...]

    def of(self, kind: Kind) -> tuple[Units, ...]:
        return self.attn if kind == "attn" else self.mlp


@dataclass(frozen=True)
class Partition:
    """A partition of every layer of a model into neuron groups."""

    layers: tuple[LayerGroups, ...]

    @classmethod
    def contiguous(cls, config: ModelConfig, attn_groups: int | None = None,
                   mlp_groups: int = MLP_GROUPS) -> Partition:
        """Split each layer into near-equal contiguous blocks (default: one group per KV head)."""
        attn_groups = config.n_kv_heads if attn_groups is None else attn_groups
        if not 1 <= attn_groups <= config.n_kv_heads:
            raise HaloError(f"attention groups must be between 1 and the number of KV heads "
                            f"({config.n_kv_heads}), got {attn_groups}")
        if not 1 <= mlp_groups <= config.intermediate_size:
            raise HaloError(f"MLP groups must be between 1 and {config.intermediate_size}, "
                            f"got {mlp_groups}")
        layer = LayerGroups(attn=split_evenly(config.n_kv_heads, attn_groups),
                            mlp=split_evenly(config.intermediate_size, mlp_groups))
        return cls(layers=(layer,) * config.n_layers)

    @classmethod
    def whole(cls, config: ModelConfig) -> Partition:
        """One attention group and one MLP group per layer: the unsplit model."""
        return cls.contiguous(config, attn_groups=1, mlp_groups=1)

    def validate(self, config: ModelConfig) -> None:
        """Raise HaloError unless every KV head and neuron of every layer is in one group."""
        if len(self.layers) != config.n_layers:
            raise HaloError(f"partition has {len(self.layers)} layers, model has "
                            f"{config.n_layers}")
        for i, lg in enumerate(self.layers):
            for kind, total in (("attn", config.n_kv_heads), ("mlp", config.intermediate_size)):
                units = [u for g in lg.of(kind) for u in g]  # type: ignore[arg-type]
                if any(not g for g in lg.of(kind)):  # type: ignore[arg-type]
                    raise HaloError(f"layer {i}: an empty {kind} group")
                if sorted(units) != list(range(total)):
                    raise HaloError(f"layer {i}: {kind} groups do not cover 0..{total - 1} "
                                    "exactly once")

    def groups(self) -> Iterator[GroupId]:
        for i, lg in enumerate(self.layers):
            for kind in KINDS:
                for j in range(len(lg.of(kind))):
                    yield GroupId(i, kind, j)

    def units(self, gid: GroupId) -> Units:
        return self.layers[gid.layer].of(gid.kind)[gid.index]

    def count(self, layer: int, kind: Kind) -> int:
        return len(self.layers[layer].of(kind))

    def to_json(self) -> str:
        return json.dumps({"layers": [{"attn": lg.attn, "mlp": lg.mlp} for lg in self.layers]},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Partition:
        data = json.loads(text)
        return cls(layers=tuple(
            LayerGroups(attn=tuple(tuple(int(u) for u in g) for g in lg["attn"]),
                        mlp=tuple(tuple(int(u) for u in g) for g in lg["mlp"]))
            for lg in data["layers"]))


def split_evenly(total: int, parts: int) -> tuple[Units, ...]:
    """0..total-1 in `parts` contiguous blocks whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(tuple(range(start, start + size)))
        start += size
    return tuple(out)


def merge_units(groups: Sequence[Units]) -> Units:
    """The units of several groups of one layer half, in order (one fused shard)."""
    return tuple(sorted(u for g in groups for u in g))


def head_spans(vocab: int, devices: Sequence[int]) -> dict[int, tuple[int, int]]:
    """The LM head's rows dealt out to `devices`: each one's (first row, row count),
    contiguous, in order, sizes differing by at most one (split_evenly's blocks)."""
    out, start = {}, 0
    for device, rows in zip(devices, split_evenly(vocab, len(devices)), strict=True):
        out[device] = (start, len(rows))
        start += len(rows)
    return out
