"""Which device computes which neuron group, and which groups are critical.

A ``Placement`` is the interface between planning (this static plan now; the semantic-aware
predictor and the load-balancing scheduler later) and the runtime, which only asks: what does
device d compute in layer l, phase p, and must the coordinator wait for it?
Device 0 is the coordinator.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from halollm.errors import HaloError
from halollm.groups import KINDS, GroupId, Kind, Partition, Units, merge_units
from halollm.model.config import ModelConfig
from halollm.predictor.critical import critical_groups

if TYPE_CHECKING:
    from halollm.scheduler.solver import DeviceSpec, GroupSpec

COORDINATOR = 0


@dataclass(frozen=True)
class Placement:
    partition: Partition
    owner: Mapping[GroupId, int]  # group -> device index
    critical: frozenset[GroupId]
    n_devices: int
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        by: dict[tuple[int, int, str], list[int]] = {}
        for gid, dev in self.owner.items():
            if not 0 <= dev < self.n_devices:
                raise HaloError(f"group {gid} placed on unknown device {dev}")
            by.setdefault((dev, gid.layer, gid.kind), []).append(gid.index)
        for v in by.values():
            v.sort()
        self._index.update(by)
        missing = set(self.partition.groups()) - set(self.owner)
        if missing:
            raise HaloError(f"{len(missing)} groups have no device (e.g. {min(missing)})")

    def groups_of(self, device: int, layer: int, kind: Kind) -> tuple[int, ...]:
        return tuple(self._index.get((device, layer, kind), ()))

    def units_of(self, device: int, layer: int, kind: Kind) -> Units:
        lg = self.partition.layers[layer].of(kind)
        return merge_units([lg[i] for i in self.groups_of(device, layer, kind)])

    def devices_in(self, layer: int, kind: Kind) -> list[int]:
        """Devices other than the coordinator with groups in this layer half."""
        return [d for d in range(1, self.n_devices) if (d, layer, kind) in self._index]

    def is_critical(self, device: int, layer: int, kind: Kind) -> bool:
        return any(GroupId(layer, kind, i) in self.critical
                   for i in self.groups_of(device, layer, kind))

    def moved(self, source: int, target: int) -> Placement:
        """The same placement with every group of `source` given to `target` (takeover)."""
        owner = {g: (target if d == source else d) for g, d in self.owner.items()}
        return Placement(self.partition, owner, self.critical, self.n_devices)

    def count(self, device: int) -> int:
        return sum(1 for d in self.owner.values() if d == device)

    def device_json(self, device: int) -> str:
        """What one device needs to know: per layer and kind, its group indices and units."""
        layers = []
        for i in range(len(self.partition.layers)):
            entry = {}
            for kind in KINDS:
                entry[kind] = {"groups": self.groups_of(device, i, kind),
                               "units": self.units_of(device, i, kind)}
            layers.append(entry)
        return json.dumps(layers, separators=(",", ":"))

    def summary(self) -> dict:
        return {"devices": self.n_devices,
                "groups_per_device": [self.count(d) for d in range(self.n_devices)],
                "critical_groups": len(self.critical),
                "groups": len(self.owner)}


def group_specs(partition: Partition, significance: Mapping[GroupId, float],
                critical: frozenset[GroupId], config: ModelConfig) -> list[GroupSpec]:
    """The scheduler's view of every group of the partition (in `partition.groups()` order):
    its round (layer half), cost in MLP-neuron equivalents of compute and memory, calibrated
    significance and whether it is critical."""
    from halollm.scheduler.solver import GroupSpec

    per_head = attention_neuron_equivalents(config)
    gids = list(partition.groups())
    halves = {key: i for i, key in enumerate(dict.fromkeys((g.layer, g.kind) for g in gids))}
    return [GroupSpec(half=halves[(g.layer, g.kind)],
                      cost=len(partition.units(g)) * (per_head if g.kind == "attn" else 1.0),
                      significance=float(significance.get(g, 0.0)), critical=g in critical)
            for g in gids]


def attention_neuron_equivalents(config: ModelConfig) -> float:
    """Weights of one KV head's attention group (its query heads' q and o rows, its k and v)
    in units of one MLP neuron's weights (gate, up and down rows)."""
    q_per_kv = config.n_heads // config.n_kv_heads
    return (2 * q_per_kv + 2) * config.head_dim / 3


@dataclass(frozen=True)
class PlanResult:
    placement: Placement
    predicted_ms: float  # the scheduler's predicted sum of round times per token
    solve_ms: float  # time the solver took
    current_ms: float | None = None  # the `current` placement's prediction (same devices)


def solved_plan(partition: Partition, significance: Mapping[GroupId, float],
                critical_share: float, devices: Sequence[DeviceSpec], config: ModelConfig,
                policy: str, device_index: Sequence[int], n_devices: int,
                reliable_loss: float = 0.02, max_lost_share: float = 0.05,
                current: Placement | None = None) -> PlanResult:
    """A placement by `policy` over the given devices (`device_index[k]` = the runtime's
    index of devices[k]; devices[0] is the coordinator): "memory" in proportion to memory
    (exo, llama.cpp), "halo" by the scheduler. With `current`, also that placement's
    predicted time on the same devices (inf if it uses a device not among them), so that
    the two can be compared."""
    from halollm.scheduler.solver import makespan, memory_split, solve

    critical = critical_groups(partition, significance, critical_share)
    specs = group_specs(partition, significance, critical, config)
    if policy == "memory":
        owner, solve_ms = memory_split(specs, devices), 0.0
    elif policy == "halo":
        sol = solve(specs, devices, reliable_loss=reliable_loss, max_lost_share=max_lost_share)
        owner, solve_ms = sol.owner, sol.solve_ms
    else:
        raise HaloError(f"unknown placement policy {policy!r}")
    placement = Placement(partition, {g: device_index[d] for g, d in
                                      zip(partition.groups(), owner, strict=True)},
                          critical if policy == "halo" else frozenset(), n_devices)
    current_ms = None
    if current is not None:
        where = {dev: k for k, dev in enumerate(device_index)}
        owners = [current.owner[g] for g in partition.groups()]
        current_ms = (makespan(specs, devices, [where[d] for d in owners])
                      if all(d in where for d in owners) else float("inf"))
    return PlanResult(placement, makespan(specs, devices, owner), solve_ms, current_ms)


def equal_plan(partition: Partition, n_devices: int, coordinator_computes: bool = True
               ) -> Placement:
    """distributed-llama's split: each layer half's groups dealt out in turn over all devices,
    the coordinator first, whatever their speed or link; nothing is critical. Without
    `coordinator_computes`, dealt out over the workers only: the coordinator embeds, norms,
    sums and samples (the `workers` placement, for a coordinator whose cost of a round,
    not its compute, bounds the token)."""
    from halollm.scheduler.solver import GroupSpec, equal_split

    first = 0 if coordinator_computes or n_devices == 1 else 1
    gids = list(partition.groups())
    halves = {key: i for i, key in enumerate(dict.fromkeys((g.layer, g.kind) for g in gids))}
    specs = [GroupSpec(half=halves[(g.layer, g.kind)], cost=len(partition.units(g)))
             for g in gids]
    owners = [first + d for d in equal_split(specs, n_devices - first)]
    return Placement(partition, dict(zip(gids, owners, strict=True)), frozenset(), n_devices)


def static_plan(partition: Partition, significance: Mapping[GroupId, float], n_workers: int,
                coordinator_share: float) -> Placement:
    """Critical groups on the coordinator; the rest spread over the workers by count
    (round-robin across all layers, so every worker gets an equal number of groups)."""
    critical = critical_groups(partition, significance, coordinator_share)
    owner: dict[GroupId, int] = {}
    turn = 0
    for gid in partition.groups():
        if gid in critical or n_workers == 0:
            owner[gid] = COORDINATOR
        else:
            owner[gid] = 1 + turn % n_workers
            turn += 1
    return Placement(partition, owner, critical, n_workers + 1)
