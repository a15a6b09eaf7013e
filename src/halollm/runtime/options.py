"""The cluster's options, in one place: grouped (sync, plan, links), each field with its
default and, where users set it, its command-line flag and help. `halo run`, `halo serve`
and the benchmarks build their flags and their options from these tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from halollm.errors import HaloError
from halollm.groups import Partition
from halollm.scheduler.placement import Placement
from halollm.units import parse_bytes

MODES = ("strict", "relaxed")
PLACEMENTS = ("static", "equal", "workers", "memory", "halo")
WIRES = ("fp32", "fp16", "bf16", "int8")


def flag(default: Any, help: str, **argparse_kw: Any) -> Any:
    """A field with a command-line flag (--name-with-dashes unless `dest` says otherwise)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class SyncOptions:
    """How a synchronisation round waits, and what it must not lose."""

    mode: str = flag("relaxed", "relaxed (default): wait for critical groups, the rest until "
                     "a deadline, over UDP; strict: wait for everything, over TCP (the "
                     "distributed-llama baseline)", choices=MODES, flag="--sync")
    deadline_ms: float | None = flag(None, "fix the relaxed-mode deadline (default: derived "
                                     "online from measured worker latency)", type=float,
                                     metavar="MS")
    critical_share: float = flag(0.98, "with a predictor, per token and layer half: the "
                                 "groups carrying this share of the predicted significance "
                                 "must arrive; a missing one is computed by the coordinator "
                                 "(default 0.98; 1 = all, exact under loss; 0 = none)",
                                 type=float, metavar="S")
    predictor: str | None = flag("auto", "predictor file; 'auto' (default): the one `halo "
                                 "calibrate` saved for the model, if any; 'none': "
                                 "criticality from the static plan only", metavar="PATH")
    wire: str | None = flag(None, "activation format on the wire (default: the compute "
                            "dtype)", choices=WIRES)
    spin_us: float = flag(0.0, "poll for partials without sleeping for up to this many "
                          "microseconds before each wait (saves a wake-up per round on a "
                          "device with a core to itself; on shared cores it takes what the "
                          "others compute with; default 0)", type=float, metavar="US")
    coalesce_us: float = flag(0.0, "after a wake-up for a partial, with more than one still "
                              "to come, pause this many microseconds before reading again, "
                              "so that one wake-up takes several workers' datagrams (fewer "
                              "wake-ups for a CPU-capped coordinator, a little later "
                              "rounds; default 0)", type=float, metavar="US")


@dataclass
class PlanOptions:
    """Which device computes which groups, and when that changes."""

    placement: str = flag("static", "static (default): critical groups on the coordinator, the "
                          "rest spread over the workers; equal: every layer's groups dealt out "
                          "equally over all devices, the coordinator included "
                          "(distributed-llama's split); workers: the same over the workers "
                          "only, the coordinator computing none (for a coordinator whose "
                          "cost of a round, not its compute, bounds a token: a CPU-capped "
                          "one); memory: in proportion to each "
                          "device's memory budget (exo, llama.cpp); halo: the load-balancing "
                          "scheduler, from measured compute speed, memory and link loss/round "
                          "trip, re-planned as they drift (docs/scheduler.md)",
                          choices=PLACEMENTS)
    coordinator_share: float = flag(0.8, "static plan: per layer half, the groups carrying "
                                    "this share of the calibrated significance stay on the "
                                    "coordinator (default 0.8)", type=float, metavar="S")
    attn_groups: int | None = flag(None, "attention groups per layer, at most the KV heads "
                                   "(default: 1, all attention one critical group on the "
                                   "coordinator; with --placement equal, one per device up to "
                                   "the KV heads, as distributed-llama splits attention by "
                                   "heads, with workers one per worker; a predictor's own "
                                   "count when one is used)",
                                   type=int, metavar="N")
    mlp_groups: int | None = flag(None, "MLP groups per layer (default 16; with --placement "
                                  "workers, the first multiple of the worker count from 16, "
                                  "so that every worker takes as many)", type=int,
                                  metavar="N")
    head: str | None = flag(None, "who computes the LM head: coordinator, or workers (its "
                            "vocabulary rows dealt out equally over the live workers, each "
                            "returning its rows' logits; the coordinator refines the best 16 "
                            "in float32 as always, and computes a worker's rows itself when "
                            "they miss the deadline) (default: workers with --placement "
                            "workers, else coordinator)", choices=("coordinator", "workers"))
    memory_budget: int | None = flag(None, "memory the coordinator offers for weights, e.g. 2G "
                                     "(default: 80%% of the available RAM); used by "
                                     "--placement memory|halo", type=parse_bytes,
                                     metavar="SIZE")
    streaming: bool = flag(True, "with --placement halo: treat every worker's memory budget "
                           "as a hard limit (by default the scheduler may give a worker more "
                           "groups than its budget holds when streaming the rest from its "
                           "model file every token, at its measured loading speed, is faster "
                           "than the alternatives)", flag="--no-streaming",
                           action="store_false")
    replan_every: int = flag(8, "with --placement halo: check every N tokens whether a new "
                             "plan is at least --hysteresis faster (default 8)", type=int,
                             metavar="N")
    hysteresis: float = flag(0.15, "adopt a new plan only if predicted at least this share "
                             "faster (default 0.15)", type=float, metavar="H")
    reliable_loss: float = 0.02  # links missing at most this share of rounds are reliable
    max_lost_share: float = 0.05  # bound on the expected significance lost per round


@dataclass
class LinkOptions:
    """The links to the workers: datagram size, liveness, joining."""

    mtu: int | None = flag(None, "largest datagram on the wire (default: each link's path "
                           "MTU as the kernel reports it: 1500 on Ethernet and Wi-Fi, one "
                           "datagram per message on loopback)", type=int)
    dead_after_s: float = 2.0  # silence after which a worker is declared dead
    join_timeout_s: float = 30.0
    rejoin_every_s: float = 2.0  # how often a lost worker's address is tried again
    drop_rates: Sequence[float] = ()  # user-space loss per worker (no kernel testbed)


GROUPS = {"sync": SyncOptions, "plan": PlanOptions, "links": LinkOptions}


@dataclass
class ClusterOptions:
    sync: SyncOptions = field(default_factory=SyncOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    links: LinkOptions = field(default_factory=LinkOptions)
    # a ready-made placement (benchmarks): (partition, static ranking) -> Placement
    custom_plan: Callable[[Partition, dict], Placement] | None = None

    @classmethod
    def build(cls, custom_plan: Callable[[Partition, dict], Placement] | None = None,
              **values: Any) -> ClusterOptions:
        """Options from field names of any group: build(mode="strict", placement="equal")."""
        parts: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        owner = {f.name: g for g, c in GROUPS.items() for f in fields(c)}
        for name, value in values.items():
            if name not in owner:
                raise TypeError(f"no cluster option named {name!r}")
            parts[owner[name]][name] = value
        return cls(**{g: GROUPS[g](**kw) for g, kw in parts.items()}, custom_plan=custom_plan)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterOptions:
        """Options from the flags that add_flags() added."""
        values = {f.name: getattr(args, f.name) for c in GROUPS.values() for f in fields(c)
                  if "help" in f.metadata}
        if values.get("predictor") == "none":
            values["predictor"] = None
        return cls.build(**values)

    def validate(self) -> None:
        """HaloError for an option out of range (before anything slow starts)."""
        if self.sync.mode not in MODES:
            raise HaloError(f"--sync must be one of {', '.join(MODES)}")
        if self.plan.placement not in PLACEMENTS:
            raise HaloError(f"--placement must be one of {', '.join(PLACEMENTS)}")
        for group, name in (("sync", "critical_share"), ("plan", "coordinator_share"),
                            ("plan", "hysteresis"), ("plan", "reliable_loss"),
                            ("plan", "max_lost_share")):
            if not 0.0 <= getattr(getattr(self, group), name) <= 1.0:
                raise HaloError(f"--{name.replace('_', '-')} must be between 0 and 1")
        if self.plan.replan_every < 1:
            raise HaloError("--replan-every must be at least 1")
        if (self.plan.mlp_groups or 1) < 1 or (self.plan.attn_groups or 1) < 1:
            raise HaloError("--mlp-groups and --attn-groups must be at least 1")
        if not 0.0 <= self.sync.spin_us <= 1e6 or not 0.0 <= self.sync.coalesce_us <= 1e5:
            raise HaloError("--spin-us must be between 0 and 1000000, --coalesce-us between "
                            "0 and 100000")
        if self.links.mtu is not None and not 576 <= self.links.mtu <= 65535:
            raise HaloError("--mtu must be between 576 and 65535 bytes")


def add_flags(p: argparse.ArgumentParser) -> None:
    """Every option that has a flag, with its default and help from the tables above."""
    for cls in GROUPS.values():
        for f in fields(cls):
            if "help" not in f.metadata:
                continue
            kw = {k: v for k, v in f.metadata.items() if k != "flag"}
            name = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            default = f.default if f.default is not MISSING else None
            p.add_argument(name, dest=f.name, default=default, **kw)
