"""The re-planning decision: a plan predicted faster is adopted only if it pays for its move."""

from __future__ import annotations

import torch

from halollm.groups import Partition
from halollm.model.config import ModelConfig
from halollm.runtime.links import WorkerLink
from halollm.runtime.options import ClusterOptions
from halollm.runtime.planner import MAX_BACKOFF, PAYBACK_TOKENS, Planner
from halollm.scheduler.placement import Placement, PlanResult, equal_plan
from halollm.scheduler.profile import DeviceProfile

CFG = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=2)


def _planner(predicted_ms: float, current_ms: float, move_ms: float | None,
             new_on_coordinator: bool = False) -> tuple[Planner, list[WorkerLink], Placement]:
    """A halo planner whose solver predicts `predicted_ms` for a new plan and `current_ms`
    for the current one (or, for the first plan, every group on the coordinator), the
    last move having taken `move_ms`; its one worker's link; the current placement (the
    equal split; the new plan is the same, or with `new_on_coordinator` every group on
    the coordinator). Its solves are counted in `p.solves`."""
    opts = ClusterOptions()
    opts.plan.placement, opts.plan.replan_every = "halo", 1
    partition = Partition.contiguous(CFG, 2, 4)
    ranking = {g: 1.0 for g in partition.groups()}
    p = Planner(opts, partition, ranking, CFG, torch.float32,
                DeviceProfile("coordinator", 100.0, 1 << 30), lambda _msg: None)
    p.move_ms = move_ms
    links = [WorkerLink(1, "127.0.0.1", 1, alive=True)]
    other = equal_plan(partition, 2)
    if new_on_coordinator:
        other = Placement(partition, dict.fromkeys(partition.groups(), 0), frozenset(), 2)
    p.solves = 0  # type: ignore[attr-defined]

    def solve(*_a: object, **_k: object) -> PlanResult:
        p.solves += 1  # type: ignore[attr-defined]
        return PlanResult(other, predicted_ms, 1.0, current_ms)

    p.solve = solve  # type: ignore[method-assign]
    return p, links, equal_plan(partition, 2)


def _reason(p: Planner, links: list[WorkerLink], current: Placement) -> str | None:
    """Why the planner moves at its next check (None: it stays), dwell and period passed."""
    p.since_check = p.since_adopt = 1000
    out = p.check(links, current, False, 1.0, 16)
    return None if out is None else out[1]["reason"]


def test_a_faster_plan_is_adopted_when_its_move_is_cheap() -> None:
    assert _reason(*_planner(predicted_ms=50.0, current_ms=100.0, move_ms=10.0)) == "faster"


def test_a_faster_plan_that_cannot_pay_for_its_move_is_not_adopted() -> None:
    saved = 20.0  # ms per token, far above the hysteresis
    # seconds to rebuild shards on slow devices
    p, links, current = _planner(80.0, 80.0 + saved, move_ms=saved * PAYBACK_TOKENS * 1.5)
    assert _reason(p, links, current) is None
    p.move_ms = saved * PAYBACK_TOKENS * 0.5
    assert _reason(p, links, current) == "faster"


def _missing(link: WorkerLink, rate: float, rounds: int = 200) -> None:
    """The link's contributions miss the deadline at `rate` over `rounds` rounds."""
    for i in range(rounds):  # one miss each time the running count of misses steps up
        link.estimate.observe(int((i + 1) * rate) == int(i * rate))
    assert abs(link.estimate.miss_rate - rate) < 0.05


def test_a_move_away_from_a_link_that_loses_significance_need_not_pay_back() -> None:
    """The worker holds half of every round's significance and misses half its rounds:
    a quarter of each round is lost, over the 5% bound, so accuracy is at stake."""
    p, links, current = _planner(predicted_ms=50.0, current_ms=100.0, move_ms=1e9,
                                 new_on_coordinator=True)
    assert _reason(p, links, current) is None
    assert p.last_kept is not None and p.last_kept["kept"] == "would not pay back its move"
    _missing(links[0], 0.5)
    assert 0.2 < p.lost_share(links, current) < 0.3
    assert _reason(p, links, current) == "accuracy"


def test_when_accuracy_is_at_stake_a_plan_losing_less_is_adopted_even_if_slower() -> None:
    """The bound on significance lost is a constraint, not a preference: a plan within it
    is taken over one outside it whatever their predicted times (before, it also had to be
    predicted 15% faster; a CI run kept its plan through a link losing 30% for 44 tokens,
    and did not record why). A plan that loses no less is not a move for accuracy, and the
    check says why it kept the plan."""
    p, links, current = _planner(predicted_ms=120.0, current_ms=100.0, move_ms=1e9,
                                 new_on_coordinator=True)
    _missing(links[0], 0.5)
    assert _reason(p, links, current) == "accuracy"
    p, links, current = _planner(predicted_ms=50.0, current_ms=100.0, move_ms=1.0)
    _missing(links[0], 0.5)  # the solver's plan is the current split: it loses as much
    assert _reason(p, links, current) is None
    assert p.last_kept == {"position": 16, "kept": "no plan loses less significance",
                           "predicted_ms": 50.0, "current_ms": 100.0,
                           "lost_share": round(p.lost_share(links, current), 4)}


def test_a_move_away_from_late_critical_contributions_must_pay_back() -> None:
    """Missed critical contributions are waited for or recomputed, and a link that misses
    a few rounds of little significance loses less than the bound: a speed matter, so the
    move must pay for itself (on quarter-core nodes a 57 s move went through as exempt)."""
    p, links, equal = _planner(predicted_ms=50.0, current_ms=100.0, move_ms=1e9)
    on_worker = {g for g, d in equal.owner.items() if d == 1}
    critical = Placement(equal.partition, equal.owner, frozenset(on_worker), 2)
    _missing(links[0], 0.5)
    assert p.lost_share(links, critical) == 0.0
    assert _reason(p, links, critical) is None
    p, links, equal = _planner(predicted_ms=50.0, current_ms=100.0, move_ms=1e9)
    _missing(links[0], 0.08)  # over reliable_loss (2%), yet 4% of each round: in bound
    assert 0.0 < p.lost_share(links, equal) < p.plan_opts.max_lost_share
    assert _reason(p, links, equal) is None
    p.move_ms = 1.0
    assert _reason(p, links, equal) == "faster"


def test_a_membership_change_moves_whatever_the_cost() -> None:
    p, links, current = _planner(predicted_ms=100.0, current_ms=100.0, move_ms=1e9)
    links[0].alive = False  # its holder is gone
    assert _reason(p, links, current) == "membership"


def test_an_adopted_move_updates_the_cost_estimate() -> None:
    p, _, current = _planner(predicted_ms=50.0, current_ms=100.0, move_ms=None)
    p.moved(1234.0, None, current)
    assert p.move_ms == 1234.0
    assert p.build_ms_per_byte == 1234.0 / p.built_bytes(None, current)


def test_a_move_is_priced_by_what_its_busiest_device_must_build() -> None:
    """A move costs what the device with the most new groups takes to build them, at the
    speed the last change was built at: on a quarter core, a plan moving most of a 1.1B
    model onto one worker took 90 s where the first distribution (a fifth of it per
    worker) had taken a few, and the old rule (the last move's time) let it through."""
    p, _, _ = _planner(predicted_ms=80.0, current_ms=100.0, move_ms=None)
    partition = p.partition
    half = equal_plan(partition, 2)
    on_worker = Placement(partition, dict.fromkeys(partition.groups(), 1), frozenset(), 2)
    first = p.built_bytes(None, half)  # the worker's half, built at the first distribution
    assert 0 < first < p.built_bytes(None, on_worker)
    assert p.built_bytes(half, half) == 0
    assert p.built_bytes(half, on_worker) == p.built_bytes(None, on_worker) - first
    saved = 20.0  # ms per token
    budget = saved * PAYBACK_TOKENS  # what the move may cost
    p.moved(0.9 * budget, None, half)  # the worker built its half in 90% of the budget
    assert p.pays_back(saved, None, half)  # the same again: pays
    assert not p.pays_back(saved, None, on_worker)  # twice that: does not
    assert p.pays_back(saved, half, half)  # nothing to build
    p.moved(0.1 * budget, None, half)
    assert p.pays_back(saved, None, on_worker)


def test_the_first_plan_uses_workers_only_if_enough_faster_than_the_coordinator_alone(
) -> None:
    """The first plan is held to the same hysteresis as a move: predicted not even 15%
    faster than every group on the coordinator, the workers are left out (predictions on
    CPU-capped devices were seen 2-3x optimistic, and a plan that uses workers then moves
    back costs seconds)."""
    p, links, _ = _planner(predicted_ms=90.0, current_ms=100.0, move_ms=None)
    first = p.initial(links)
    assert first.count(1) == 0 and first.count(0) == len(list(first.partition.groups()))
    assert p.replans[0]["coordinator_alone"] is True
    assert p.replans[0]["predicted_ms"] == 100.0 and p.replans[0]["distributed_ms"] == 90.0
    p, links, _ = _planner(predicted_ms=80.0, current_ms=100.0, move_ms=None)
    assert p.initial(links).count(1) > 0 and "coordinator_alone" not in p.replans[0]


def test_checks_that_keep_the_plan_back_off_until_a_link_misses_rounds() -> None:
    """A check solves the placement program (~20 ms here, ~80 on a quarter core): checks
    that keep the plan double the period up to MAX_BACKOFF times; a link holding groups
    that starts missing rounds is checked at once."""
    p, links, current = _planner(predicted_ms=100.0, current_ms=100.0, move_ms=None)
    p.since_adopt = 1000
    for position in range(20):
        assert p.check(links, current, False, 1.0, position) is None
    # replan_every = 1: checks after 1, 2, 4, 4, 4, 4 tokens
    assert p.solves == 6  # type: ignore[attr-defined]
    assert p.period == MAX_BACKOFF
    for _ in range(50):
        links[0].estimate.observe(False)
    p.check(links, current, False, 1.0, 20)
    assert p.solves == 7 and p.period == 2  # type: ignore[attr-defined]


def test_a_check_on_unchanged_measurements_does_not_solve_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With nothing measured anew (a plan that keeps the workers idle measures nothing),
    the program's answer cannot change: the last result is reused, not solved again."""
    from halollm.runtime import planner as planner_module

    opts = ClusterOptions()
    opts.plan.placement = "halo"
    partition = Partition.contiguous(CFG, 2, 4)
    p = Planner(opts, partition, {g: 1.0 for g in partition.groups()}, CFG, torch.float32,
                DeviceProfile("coordinator", 100.0, 1 << 30), lambda _msg: None)
    link = WorkerLink(1, "127.0.0.1", 1, alive=True)
    link.profile = DeviceProfile("w", 100.0, 1 << 30)
    calls = []
    real = planner_module.solved_plan
    monkeypatch.setattr(planner_module, "solved_plan",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    current = equal_plan(partition, 2)
    first = p.solve([link], current, 1.0)
    assert p.solve([link], current, 1.0) is first and len(calls) == 1
    link.estimate.observe(True, 3.0)  # a round measured
    assert p.solve([link], current, 1.0) is not first and len(calls) == 2
    assert p.solve([link], equal_plan(partition, 2), 1.0) and len(calls) == 3  # new plan
