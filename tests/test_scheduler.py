"""The placement solver on hand-made cases with known answers (pure, fast)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from halollm.errors import HaloError
from halollm.scheduler.solver import DeviceSpec, GroupSpec, equal_split, memory_split, solve


def layers(n_halves: int, per_half: int, cost: float = 1.0,
           significance: list[float] | None = None) -> list[GroupSpec]:
    sig = significance or [1.0] * per_half
    return [GroupSpec(half=h, cost=cost, significance=sig[j]) for h in range(n_halves)
            for j in range(per_half)]


def per_device(owner: list[int], n: int) -> list[int]:
    c = Counter(owner)
    return [c.get(d, 0) for d in range(n)]


def test_equal_devices_get_equal_work():
    groups = layers(4, 12)
    sol = solve(groups, [DeviceSpec(f"d{i}") for i in range(4)])
    assert per_device(sol.owner, 4) == [12, 12, 12, 12]
    assert sol.objective_ms == pytest.approx(4 * 3.0)
    for h in range(4):  # and equal within every round, not only overall
        half = [o for g, o in zip(groups, sol.owner, strict=True) if g.half == h]
        assert per_device(half, 4) == [3, 3, 3, 3]


def test_a_device_twice_as_fast_gets_twice_the_work():
    sol = solve(layers(2, 12), [DeviceSpec("slow", speed=1), DeviceSpec("fast", speed=2)])
    assert per_device(sol.owner, 2) == [8, 16]


def test_a_lossy_link_gets_only_insignificant_groups():
    sig = [10.0, 10.0, 5.0, 1.0, 0.1, 0.1, 0.1, 0.1]
    groups = [GroupSpec(0, 1.0, s, critical=s >= 5) for s in sig]
    devices = [DeviceSpec("coord"), DeviceSpec("wired"), DeviceSpec("wifi", loss=0.05)]
    sol = solve(groups, devices, reliable_loss=0.0, max_lost_share=0.05)
    lossy = [g for g, o in zip(groups, sol.owner, strict=True) if o == 2]
    assert lossy and all(not g.critical for g in lossy)
    lost = sum(g.significance * 0.05 for g in lossy)
    assert lost <= 0.05 * sum(sig) + 1e-9


def test_expected_loss_bound_limits_what_a_lossy_link_carries():
    groups = layers(1, 10, significance=[1.0] * 10)
    devices = [DeviceSpec("coord"), DeviceSpec("wifi", loss=0.1)]
    free = solve(groups, devices, max_lost_share=1.0)
    assert per_device(free.owner, 2) == [5, 5]
    bounded = solve(groups, devices, max_lost_share=0.02)  # 0.1 loss x 2 groups = 0.2 of 10
    assert per_device(bounded.owner, 2)[1] <= 2


def test_memory_caps_are_respected():
    groups = layers(3, 8, cost=10.0)
    devices = [DeviceSpec("coord", memory=200), DeviceSpec("small", memory=40),
               DeviceSpec("big")]
    sol = solve(groups, devices)
    used = [sum(g.cost for g, o in zip(groups, sol.owner, strict=True) if o == d)
            for d in range(3)]
    assert used[0] <= 200 and used[1] <= 40
    assert sum(used) == 240


def test_infeasible_inputs_are_clear_errors():
    with pytest.raises(HaloError, match="cannot hold"):
        solve(layers(1, 4, cost=10), [DeviceSpec("a", memory=10), DeviceSpec("b", memory=10)])
    crit = [GroupSpec(0, 10.0, 1.0, critical=True) for _ in range(3)]
    with pytest.raises(HaloError, match="critical groups"):
        solve(crit, [DeviceSpec("coord", memory=10), DeviceSpec("wifi", memory=100,
                                                                 loss=0.05)])
    with pytest.raises(HaloError, match="no placement"):
        # memory fits overall, but the loss bound forbids the lossy device any group
        solve(layers(1, 4, cost=10), [DeviceSpec("coord", memory=20),
                                      DeviceSpec("wifi", memory=100, loss=0.5)],
              max_lost_share=0.0)


def test_baselines():
    groups = layers(2, 8)
    assert per_device(equal_split(groups, 4), 4) == [4, 4, 4, 4]
    devices = [DeviceSpec("a", memory=100), DeviceSpec("b", memory=300)]
    assert per_device(memory_split(groups, devices), 2) == [4, 12]


def test_a_model_sized_problem_solves_quickly():
    """30 layers x 16 MLP groups over 8 heterogeneous devices (the issue's testbed shape)."""
    sig = [math.exp(-j / 4) for j in range(16)]
    groups = [GroupSpec(h, 96.0, sig[j], critical=j < 2) for h in range(30) for j in range(16)]
    devices = [DeviceSpec("coord", 40), DeviceSpec("fast", 40), DeviceSpec("slow1", 12),
               DeviceSpec("slow2", 12), DeviceSpec("l5a", 40, loss=0.05),
               DeviceSpec("l5b", 40, loss=0.05), DeviceSpec("l10a", 40, loss=0.10),
               DeviceSpec("l10b", 40, loss=0.10)]
    sol = solve(groups, devices, max_lost_share=0.02, time_limit_s=30)
    counts = per_device(sol.owner, 8)
    assert counts[2] < counts[1] and counts[3] < counts[0]  # slow devices get less
    equal_ms = 30 * max(16 / 8 * 96 / d.speed for d in devices)  # 2 groups each per round
    assert sol.objective_ms <= 0.5 * equal_ms


def test_a_round_trip_that_costs_more_than_it_saves_leaves_a_device_unused():
    """Latency is paid once per round by every device taking part: a worker whose round trip
    exceeds what it could save gets nothing; a cheap one gets a share."""
    groups = layers(2, 16, cost=1.0)
    far = solve(groups, [DeviceSpec("coord", speed=4.0), DeviceSpec("far", 4.0, latency=5.0)])
    assert per_device(far.owner, 2) == [32, 0] and far.objective_ms == pytest.approx(8.0)
    near = solve(groups, [DeviceSpec("coord", speed=4.0),
                          DeviceSpec("near", 4.0, latency=1.0)])
    assert per_device(near.owner, 2) == [20, 12]  # 10/4 = 6/4 + 1 per round
    assert near.objective_ms == pytest.approx(5.0)


def test_a_coordinator_that_pays_per_worker_uses_only_the_workers_that_pay_off():
    """Quarter-core nodes (issue 16): the coordinator sends to, receives from and sums every
    worker in a round, one after the other. With that cost the plan takes fewer workers than
    the equal split -- and is never predicted slower than it, on the model's own terms."""
    from halollm.scheduler.solver import makespan

    groups = layers(2, 16, cost=1.0)  # 16 ms of work per round on one device
    free = [DeviceSpec("coord", 1.0)] + [DeviceSpec(f"w{i}", 1.0) for i in range(7)]
    assert per_device(solve(groups, free).owner, 8) == [4] * 8  # nothing to save: all 8
    hub = [DeviceSpec("coord", 1.0, hub_ms=2.0)] + free[1:]
    sol = solve(groups, hub)
    used = sum(1 for n in per_device(sol.owner, 8)[1:] if n)
    # k workers and n0 groups on the coordinator: a round takes max(n0 + 2k, (16 - n0) / k);
    # k=2: 6.7 (n0 = 8/3), k=3: 6 (n0 = 0, workers 6/5/5), k=4: 8
    assert used == 3 and sol.objective_ms == pytest.approx(2 * 6.0)
    assert makespan(groups, hub, sol.owner) == pytest.approx(sol.objective_ms)
    equal = equal_split(groups, 8)
    assert makespan(groups, hub, equal) == pytest.approx(2 * (2 + 14))
    assert sol.objective_ms < makespan(groups, hub, equal)


def test_critical_groups_go_to_reliable_devices_first():
    sig = [8.0, 4.0, 2.0, 1.0]
    groups = [GroupSpec(0, 1.0, s, critical=s >= 4) for s in sig]
    sol = solve(groups, [DeviceSpec("coord"), DeviceSpec("wifi", loss=0.2)])
    assert sol.owner == [0, 0, 1, 1]  # the two significant ones on the coordinator


def test_sizes_parse_and_bad_ones_are_clear():
    from halollm.units import parse_bytes

    assert parse_bytes("512M") == 512 << 20 and parse_bytes("1.5G") == 3 << 29
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("1000") == 1000
    for bad in ("lots", "12Q", "-1G", "0"):
        with pytest.raises(HaloError):
            parse_bytes(bad)


def test_link_estimate_follows_a_link_that_starts_losing():
    from halollm.scheduler.profile import LinkEstimate

    est = LinkEstimate(alpha=0.02)
    for _ in range(300):
        est.observe(True, 1.0)
    assert est.miss_rate == 0.0 and est.delay_ms == pytest.approx(1.0)
    for i in range(300):  # 30% of rounds now miss
        est.observe(i % 10 >= 3, 1.0 if i % 10 >= 3 else None)
    assert 0.2 < est.miss_rate < 0.4 and est.missed == 90


def test_a_coordinator_whose_fixed_cost_outweighs_its_share_computes_none():
    """The coordinator's latency is what computing any share costs it besides the neurons
    (a call's fixed cost: on a CPU-capped coordinator more than a small share's compute);
    the solver then leaves it only the hub work, and makespan agrees."""
    from halollm.scheduler.solver import makespan

    groups = layers(4, 14)
    workers = [DeviceSpec(f"w{i}", latency=0.1) for i in range(7)]
    sol = solve(groups, [DeviceSpec("coord", latency=2.0), *workers])
    assert per_device(sol.owner, 8) == [0] + [8] * 7
    assert sol.objective_ms == pytest.approx(4 * 2.1)
    shared = [0] + [1 + k % 7 for k in range(13)]  # one group per half on the coordinator
    devices = [DeviceSpec("coord", latency=2.0), *workers]
    assert makespan(groups, devices, shared * 4) == pytest.approx(4 * 3.0)
    free = solve(groups, [DeviceSpec("coord"), *workers])  # no fixed cost: it takes a share
    assert per_device(free.owner, 8)[0] > 0


def test_makespan_matches_the_solver_objective():
    from halollm.scheduler.solver import makespan

    groups = layers(3, 8)
    devices = [DeviceSpec("coord", 2.0), DeviceSpec("w", 1.0, latency=0.5)]
    sol = solve(groups, devices)
    assert makespan(groups, devices, sol.owner) == pytest.approx(sol.objective_ms)
    assert makespan(groups, devices, [0] * 24) == pytest.approx(12.0)


def test_streaming_beyond_memory_when_loading_is_cheaper_than_a_lossy_link():
    """Coordinator and a reliable worker both too small for the model; a lossy device with
    room. Without a loader the lossy device must take the rest; a worker that streams fast
    keeps everything reliable and streams the excess; one that streams slowly does not."""
    from halollm.scheduler.solver import makespan

    groups = layers(4, 8, cost=1.0)  # 32 units
    sig = [GroupSpec(g.half, g.cost, 1.0) for g in groups]

    def devices(load_speed: float) -> list[DeviceSpec]:
        return [DeviceSpec("coord", 1.0, memory=8),
                DeviceSpec("wired", 1.0, memory=8, load_speed=load_speed),
                DeviceSpec("wifi", 1.0, loss=0.1, latency=20.0)]

    hard = solve(sig, devices(0.0))
    assert per_device(hard.owner, 3)[2] == 16  # what the two budgets cannot hold
    fast = solve(sig, devices(100.0))
    counts = per_device(fast.owner, 3)
    assert counts[2] == 0 and counts[1] > 8  # the excess streams on the reliable worker
    excess = counts[1] - 8
    assert fast.objective_ms == pytest.approx(makespan(sig, devices(100.0), fast.owner))
    assert fast.objective_ms == pytest.approx(4 * max(counts[:2]) / 4 + excess / 100.0,
                                              rel=0.05)
    slow = solve(sig, devices(0.01))  # 1 unit costs 100 ms to stream: not worth it
    assert per_device(slow.owner, 3)[2] == 16
    # the memory check counts a streaming device as unbounded
    tiny = [DeviceSpec("coord", memory=1), DeviceSpec("w", memory=1, load_speed=1.0)]
    assert sum(per_device(solve(sig, tiny).owner, 2)) == 32
    with pytest.raises(HaloError, match="cannot hold"):
        solve(sig, [DeviceSpec("coord", memory=1), DeviceSpec("w", memory=1)])


def test_a_round_with_any_worker_costs_the_coordinator_its_fixed_part():
    """What a round with workers costs the coordinator besides each worker (encoding the
    activation, summing): when it exceeds what a worker saves, the plan keeps every
    group on the coordinator; the program's objective and makespan agree either way."""
    from halollm.scheduler.solver import makespan

    groups = layers(2, 4, cost=1.0)  # 4 ms per round on the coordinator alone
    for fixed, workers_used in ((0.5, True), (3.5, False)):
        devices = [DeviceSpec("coord", 1.0, hub_ms=0.2, hub_round_ms=fixed),
                   DeviceSpec("w", 1.0, latency=0.1)]
        sol = solve(groups, devices)
        # one worker with k groups: max(4 - k + 0.2 + fixed, k + 0.1); alone: 4
        assert (per_device(sol.owner, 2)[1] > 0) == workers_used
        assert makespan(groups, devices, sol.owner) == pytest.approx(sol.objective_ms)
    assert sol.objective_ms == pytest.approx(2 * 4.0)


def test_links_not_used_yet_are_priced_at_their_probe_times_the_live_calibration():
    """A link that has carried rounds has a live round trip; one that has only been
    probed (at idle, before any plan) is priced at its probe times how much longer live
    round trips turned out than probed ones on the links that have both -- else every
    unused link looks faster than every used one and the plan hops between them."""
    from halollm.scheduler.profile import DeviceProfile
    from halollm.scheduler.specs import WorkerState, device_specs, probe_calibration

    def worker(i: int, probe: float, live: float | None) -> WorkerState:
        est = _estimate(0.0, live)
        est.probe_ms = probe
        return WorkerState(i, f"w{i}", DeviceProfile(f"w{i}", 10.0, 100), est, 0.0)

    coord = DeviceProfile("coordinator", 10.0, 100)
    used = [worker(1, 0.5, 3.0), worker(2, 0.4, 2.0)]  # live / probe: 6 and 5
    fresh = worker(3, 0.4, None)
    assert probe_calibration([*used, fresh]) == pytest.approx(6.0)  # the upper median
    specs, _ = device_specs(coord, [*used, fresh], 0.0, 1.0, streaming=False)
    assert [s.latency for s in specs[1:]] == pytest.approx([3.0, 2.0, 0.4 * 6.0])
    specs, _ = device_specs(coord, [fresh], 0.0, 1.0, streaming=False)
    assert specs[1].latency == pytest.approx(0.4)  # nothing to calibrate against yet


# -- device specs and critical groups (pure) -------------------------------------------------
def _estimate(miss_rate: float, delay_ms: float | None):  # type: ignore[no-untyped-def]
    from halollm.scheduler.profile import LinkEstimate

    est = LinkEstimate()
    est.miss_rate, est.delay_ms = miss_rate, delay_ms
    return est


def test_device_specs_price_round_trips_misses_and_streaming():
    """The coordinator first; a worker's speed is discounted by the coordinator's recompute
    of what it misses; its latency is the round trip beyond its own compute (a LAN guess
    until one is measured) plus the expected wait for the deadline; a worker with no
    measured speed is left out; loading speed only counts when streaming."""
    from halollm.scheduler.profile import DEFAULT_HUB_MS, DeviceProfile
    from halollm.scheduler.specs import DEFAULT_RTT_MS, WorkerState, device_specs

    coord = DeviceProfile("coordinator", 100.0, 1000)
    workers = [
        WorkerState(1, "wired", DeviceProfile("wired", 50.0, 500, load_speed=7.0),
                    _estimate(0.0, 2.0), units_per_round=50.0),
        WorkerState(2, "idle", DeviceProfile("idle", 0.0, 500), _estimate(0.0, None), 0.0),
        WorkerState(3, "wifi", DeviceProfile("wifi", 25.0, 250, live_speed=20.0),
                    _estimate(0.1, None), units_per_round=0.0),
        WorkerState(4, "fast", DeviceProfile("fast", 50.0, 500), _estimate(0.0, 0.5),
                    units_per_round=100.0),
    ]
    specs, index = device_specs(coord, workers, deadline_ms=4.0, bytes_per_unit=10.0,
                                streaming=True)
    assert index == [0, 1, 3, 4]
    assert [s.name for s in specs] == ["coordinator", "wired", "wifi", "fast"]
    c, wired, wifi, fast = specs
    assert (c.speed, c.memory, c.loss, c.latency, c.load_speed) == (100.0, 100.0, 0, 0, 0)
    assert c.hub_ms == DEFAULT_HUB_MS  # until rounds measured it
    coord.hub_ms, coord.call_ms = 0.4, 1.5  # its fixed cost of a share: its latency
    again = device_specs(coord, workers, 4.0, 10.0, streaming=True)[0][0]
    assert (again.hub_ms, again.latency) == (0.4, 1.5)
    assert wired.speed == pytest.approx(50.0) and wired.memory == pytest.approx(50.0)
    assert wired.latency == pytest.approx(2.0 - 50.0 / 50.0) and wired.load_speed == 7.0
    assert wifi.speed == pytest.approx(1 / (1 / 20.0 + 0.1 / 100.0))  # min(bench, live)
    assert wifi.loss == 0.1 and wifi.latency == pytest.approx(DEFAULT_RTT_MS + 0.1 * 4.0)
    assert fast.latency == pytest.approx(0.05)  # a round trip never below 50 µs
    specs, _ = device_specs(coord, workers, 4.0, 10.0, streaming=False)
    assert all(s.load_speed == 0 for s in specs)


def test_units_per_round_is_the_mean_over_the_rounds_a_device_takes_part_in():
    from halollm.groups import GroupId, LayerGroups, Partition
    from halollm.scheduler.placement import Placement
    from halollm.scheduler.specs import units_per_round

    part = Partition((LayerGroups(attn=((0,),), mlp=((0, 1), (2,), (3, 4, 5))),) * 2)
    owner = {g: 0 for g in part.groups()}
    owner[GroupId(0, "mlp", 0)] = 1  # 2 neurons in layer 0
    owner[GroupId(1, "mlp", 1)] = owner[GroupId(1, "mlp", 2)] = 1  # 4 in layer 1
    owner[GroupId(1, "attn", 0)] = 2  # attention only: no MLP rounds
    p = Placement(part, owner, frozenset(), 3)
    assert units_per_round(p, 1, 2) == 3.0  # (2 + 4) / 2
    assert units_per_round(p, 0, 2) == 3.0  # (4 + 2) / 2
    assert units_per_round(p, 2, 2) == 0.0 and units_per_round(None, 1, 2) == 0.0


def test_carrying_is_the_smallest_set_of_the_largest_reaching_the_share():
    import numpy as np

    from halollm.predictor.critical import carrying

    rng = np.random.default_rng(1)
    for _ in range(300):
        values = rng.random(int(rng.integers(1, 12))) ** 3 * 10
        share = float(rng.random())
        chosen = carrying(values, share)
        total, got = values.sum(), values[chosen]
        assert got.sum() >= share * total - 1e-9  # reaches the share
        assert got[:-1].sum() < share * total  # one group fewer would not
        assert list(got) == sorted(got, reverse=True)  # the largest first
        rest = np.delete(values, chosen)
        assert got.min() >= rest.max(initial=0)
    assert len(carrying(np.array([3.0, 1.0]), 0.0)) == 0
    assert sorted(carrying(np.array([3.0, 0.0]), 1.0)) == [0, 1]  # 1: all, zeros too
    assert sorted(carrying(np.zeros(3), 0.5)) == [0, 1, 2]  # nothing known: all


def test_critical_groups_are_chosen_per_layer_half():
    from halollm.groups import GroupId, LayerGroups, Partition
    from halollm.predictor.critical import critical_groups

    part = Partition((LayerGroups(attn=((0,), (1,)), mlp=((0,), (1,), (2,), (3,))),) * 2)
    sig = {GroupId(0, "mlp", 0): 1.0, GroupId(0, "mlp", 1): 6.0, GroupId(0, "mlp", 2): 3.0,
           GroupId(0, "attn", 1): 5.0, GroupId(1, "mlp", 3): 2.0}
    crit = critical_groups(part, sig, 0.6)
    assert crit == {GroupId(0, "mlp", 1), GroupId(0, "attn", 1), GroupId(1, "mlp", 3),
                    GroupId(1, "attn", 0), GroupId(1, "attn", 1)}  # no significance: all
    assert critical_groups(part, sig, 0.0) == frozenset()
    with pytest.raises(HaloError, match="between 0 and 1"):
        critical_groups(part, sig, 1.5)
