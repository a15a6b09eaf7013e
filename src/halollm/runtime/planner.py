"""When and to what the placement changes: the first plan by the chosen policy, and (halo
placement) a new plan every few tokens when it is predicted enough faster, or when a worker
came or went. It decides; the coordinator applies the change between tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from halollm.errors import HaloError
from halollm.groups import GroupId, Partition
from halollm.loader.weights import group_nbytes
from halollm.model.config import ModelConfig
from halollm.model.formats import Weights
from halollm.runtime.links import WorkerLink
from halollm.runtime.options import ClusterOptions
from halollm.scheduler.placement import (
    COORDINATOR,
    Placement,
    PlanResult,
    equal_plan,
    solved_plan,
    static_plan,
)
from halollm.scheduler.profile import DeviceProfile
from halollm.scheduler.specs import WorkerState, device_specs, units_per_round

DWELL_CHECKS = 2  # a plan adopted for speed stays for at least this many re-planning checks
PAYBACK_TOKENS = 256  # a move for speed must pay for itself within this many tokens
MAX_BACKOFF = 4  # checks that keep the plan double the period, up to this many times


class Planner:
    def __init__(self, opts: ClusterOptions, partition: Partition,
                 ranking: Mapping[GroupId, float], config: ModelConfig,
                 dtype: Weights | torch.dtype,
                 coordinator: DeviceProfile, log: Callable[[str], None]) -> None:
        self.opts, self.plan_opts = opts, opts.plan
        self.partition, self.ranking, self.config = partition, ranking, config
        self.coordinator, self.log = coordinator, log
        self._unit_bytes = {kind: group_nbytes(config, kind, 1, dtype) for kind in ("attn", "mlp")}
        self.bytes_per_unit = self._unit_bytes["mlp"]
        self.replans: list[dict[str, Any]] = []
        self.force = False  # re-plan at the next token (a worker rejoined)
        self.since_check = 0
        self.since_adopt = DWELL_CHECKS * self.plan_opts.replan_every  # the first may go
        self.period = self.plan_opts.replan_every  # tokens between checks, now
        self.move_ms: float | None = None  # what the last plan change took to apply
        self.build_ms_per_byte: float | None = None  # ... per byte its busiest device built
        self._last: tuple[tuple, Placement | None, PlanResult] | None = None  # last solve
        self.last_kept: dict[str, Any] | None = None  # the last check that kept the plan

    @property
    def adaptive(self) -> bool:
        return self.plan_opts.placement == "halo" and self.opts.custom_plan is None

    def initial(self, links: list[WorkerLink]) -> Placement:
        n = len(links) + 1
        if self.opts.custom_plan is not None:
            return self.opts.custom_plan(self.partition, dict(self.ranking))
        if self.plan_opts.placement in ("equal", "workers"):
            return equal_plan(self.partition, n, self.plan_opts.placement == "equal")
        if self.plan_opts.placement == "static":
            return static_plan(self.partition, self.ranking, len(links),
                               self.plan_opts.coordinator_share)
        alone = self._alone(links)
        plan = self.solve(links, alone, deadline_ms=0.0)
        record = {"position": 0, "reason": "initial", "predicted_ms": round(plan.predicted_ms, 3),
                  "solve_ms": round(plan.solve_ms, 1)}
        if alone is not None and plan.current_ms is not None and \
                plan.predicted_ms > (1 - self.plan_opts.hysteresis) * plan.current_ms:
            # not enough faster than the coordinator alone to be worth the workers (the
            # same hysteresis as a move: the prediction is not that exact)
            record.update(coordinator_alone=True, predicted_ms=round(plan.current_ms, 3),
                          distributed_ms=round(plan.predicted_ms, 3))
            placement = alone
        else:
            placement = plan.placement
        record["groups_per_device"] = placement.summary()["groups_per_device"]
        self.replans.append(record)
        return placement

    def _alone(self, links: list[WorkerLink]) -> Placement | None:
        """Every group on the coordinator, if its memory holds them all (halo placement)."""
        if self.plan_opts.placement != "halo":
            return None
        units = sum(len(self.partition.units(g)) for g in self.partition.groups())
        if self.coordinator.memory_bytes < units * self.bytes_per_unit:
            return None
        return Placement(self.partition, dict.fromkeys(self.partition.groups(), 0),
                         frozenset(), len(links) + 1)

    def solve(self, links: list[WorkerLink], current: Placement | None, deadline_ms: float
              ) -> PlanResult:
        """A placement by the `memory` or `halo` policy over the live devices (and, given
        the current one, its predicted time on the same measurements)."""
        n_layers = self.config.n_layers
        workers = [WorkerState(lk.index, lk.name, lk.profile, lk.estimate,
                               units_per_round(current, lk.index, n_layers))
                   for lk in links if lk.alive and lk.profile is not None]
        specs, index = device_specs(self.coordinator, workers, deadline_ms,
                                    self.bytes_per_unit, self.plan_opts.streaming)
        key = (tuple(specs), tuple(index))
        if self._last is not None and self._last[0] == key and self._last[1] is current:
            return self._last[2]  # nothing measured has changed: nor would the plan
        result = solved_plan(
            self.partition, self.ranking, self.plan_opts.coordinator_share, specs, self.config,
            self.plan_opts.placement, index, len(links) + 1,
            reliable_loss=self.plan_opts.reliable_loss,
            max_lost_share=self.plan_opts.max_lost_share, current=current)
        self._last = (key, current, result)
        return result

    def check(self, links: list[WorkerLink], current: Placement, taken_over: bool,
              deadline_ms: float, position: int) -> tuple[Placement, dict[str, Any]] | None:
        """Between decode tokens: every `period` tokens, plan again from the profiles as
        measured now; a new plan (and its record) if a worker came or went, if the current
        plan loses more significance than the bound and the new one loses less, or if it
        is predicted at least `hysteresis` faster than the current one (so it does not
        flap) and the time it saves over PAYBACK_TOKENS tokens exceeds what the last change
        took to apply (on slow devices, building new shards takes seconds). The period starts at
        `replan_every` and doubles after each check that keeps the plan, up to MAX_BACKOFF
        times (a solve takes ~20 ms here, ~80 ms on a quarter core: checking every 8 tokens
        cost 2.5 ms per token of a plan that never changed); it is back at `replan_every`
        after a change and at once when a link holding groups starts missing rounds."""
        if not self.adaptive:
            return None
        self.since_check += 1
        self.since_adopt += 1
        every = self.plan_opts.replan_every
        alive = {lk.index for lk in links if lk.alive}
        holders = {d for d in range(1, len(links) + 1) if current.count(d)}
        changed = bool(holders - alive) or taken_over or self.force
        self.force = False
        # a link holding groups that misses rounds is checked at once (no backoff delays
        # it); a move away from it is exempt from the payback rule only when the current
        # plan's expected loss of significance is over the bound: then accuracy is at
        # stake. Missed critical contributions are waited for or recomputed, and on
        # CPU-capped devices most misses are late answers: a speed matter, which a move
        # must pay back (a 57 s move went through on quarter-core nodes, session 11)
        unreliable = any(lk.alive and current.count(lk.index) and
                         lk.estimate.miss_rate > self.plan_opts.reliable_loss for lk in links)
        # the current plan's expected share lost (none without a lossy link holding groups)
        lost = self.lost_share(links, current) if unreliable else 0.0
        at_stake = lost > self.plan_opts.max_lost_share
        if changed or unreliable:
            self.period = every
        if not changed and (self.since_check < self.period or
                            self.since_adopt < DWELL_CHECKS * every):
            return None
        self.since_check = 0
        self.period = min(2 * self.period, MAX_BACKOFF * every)  # until something changes
        try:
            plan = self.solve(links, current, deadline_ms)
        except HaloError as exc:
            self.log(f"re-planning failed, keeping the current plan: {exc}")
            return None
        was = plan.current_ms if plan.current_ms is not None else float("inf")
        kept = None if changed else self._kept_because(links, current, plan, was, at_stake,
                                                       lost)
        if kept is not None:
            self.last_kept = {"position": position, "kept": kept,
                               "predicted_ms": round(plan.predicted_ms, 3),
                               "current_ms": round(was, 3) if was != float("inf") else None,
                               "lost_share": round(lost, 4)}
            return None
        self.period = every
        return plan.placement, {
            "position": position, "predicted_ms": round(plan.predicted_ms, 3),
            "previous_ms": round(was, 3) if was != float("inf") else None,
            "solve_ms": round(plan.solve_ms, 1),
            "reason": "membership" if changed else "accuracy" if at_stake else "faster"}

    def _kept_because(self, links: list[WorkerLink], current: Placement, plan: PlanResult,
                      was: float, at_stake: bool, lost: float) -> str | None:
        """Why a check keeps the current plan (None: adopt the new one). When accuracy is at
        stake, a plan that loses less significance is adopted even if not faster: the bound
        on significance lost is the scheduler's constraint, not a preference. Otherwise the
        new plan must be `hysteresis` faster and pay back its move. `lost`: the current
        plan's lost share."""
        if at_stake:
            if self.lost_share(links, plan.placement) < lost:
                return None
            return "no plan loses less significance"
        if plan.predicted_ms > (1 - self.plan_opts.hysteresis) * was:
            return "not enough faster"
        if not self.pays_back(was - plan.predicted_ms, current, plan.placement):
            return "would not pay back its move"
        return None

    def lost_share(self, links: list[WorkerLink], placement: Placement) -> float:
        """The largest expected share of a round's significance lost per round under
        `placement` at the links' measured miss rates: the non-critical groups behind links
        missing more than `reliable_loss` of their rounds (as the scheduler bounds it; the
        small misses of reliable links are not counted)."""
        miss = {lk.index: lk.estimate.miss_rate for lk in links
                if lk.alive and lk.estimate.miss_rate > self.plan_opts.reliable_loss}
        total: dict[tuple[int, str], float] = {}
        lost: dict[tuple[int, str], float] = {}
        for gid, dev in placement.owner.items():
            half, sig = (gid.layer, gid.kind), self.ranking.get(gid, 0.0)
            total[half] = total.get(half, 0.0) + sig
            if dev in miss and gid not in placement.critical:
                lost[half] = lost.get(half, 0.0) + sig * miss[dev]
        return max((v / total[h] for h, v in lost.items() if total[h] > 0), default=0.0)

    def pays_back(self, saved_ms_per_token: float, current: Placement | None = None,
                  new: Placement | None = None) -> bool:
        """Whether a move saves more over PAYBACK_TOKENS tokens than it costs: what the
        busiest device must build (devices build in parallel), at the speed the last change
        was built at; without both plans, what the last change took."""
        cost = self.move_ms
        if new is not None and self.build_ms_per_byte is not None:
            cost = self.build_ms_per_byte * self.built_bytes(current, new)
        return cost is None or saved_ms_per_token * PAYBACK_TOKENS >= cost

    def built_bytes(self, old: Placement | None, new: Placement) -> int:
        """The most weight bytes any one device (the coordinator included) must build to go
        from `old` (None: every group on the coordinator) to `new`: the groups it holds in
        `new` and did not in `old`."""
        per: dict[int, int] = {}
        for gid, dev in new.owner.items():
            if (old.owner.get(gid) if old is not None else COORDINATOR) != dev:
                per[dev] = per.get(dev, 0) + \
                    len(new.partition.units(gid)) * self._unit_bytes[gid.kind]
        return max(per.values(), default=0)

    def moved(self, ms: float, old: Placement | None, new: Placement) -> None:
        """A plan change (the first distribution too) took `ms` to apply: the move cost
        model learns its build speed from it."""
        self.move_ms = ms
        built = self.built_bytes(old, new)
        if built > 0:
            self.build_ms_per_byte = ms / built

    def adopted(self, record: dict[str, Any], placement: Placement) -> None:
        self.since_adopt = 0
        record["groups_per_device"] = placement.summary()["groups_per_device"]
        self.replans.append(record)

    def restored(self, current: Placement, initial: Placement, device: int) -> Placement:
        """After a rejoin (fixed policies): the device gets its groups of the first plan back."""
        owner = dict(current.owner)
        for gid, dev in initial.owner.items():
            if dev == device:
                owner[gid] = device
        return Placement(current.partition, owner, current.critical, current.n_devices)

