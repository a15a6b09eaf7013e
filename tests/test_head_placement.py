"""Who computes the LM head under `--placement halo` (scheduler/head.py), and the policies."""

from __future__ import annotations

import pytest
import torch

from halollm.groups import Partition
from halollm.model.config import ModelConfig
from halollm.runtime.links import WorkerLink
from halollm.runtime.options import ClusterOptions
from halollm.runtime.planner import Planner
from halollm.scheduler.head import HeadWorker, head_ms_alone, head_ms_split, head_workers
from halollm.scheduler.placement import Placement, equal_plan
from halollm.scheduler.profile import DeviceProfile, LinkEstimate

VOCAB = 49152  # m1024's (SmolLM2's tokenizer)


def _workers(n: int, speed: float, rtt_ms: float) -> list[HeadWorker]:
    return [HeadWorker(i + 1, speed, rtt_ms) for i in range(n)]


def test_a_cpu_capped_coordinator_hands_the_head_to_the_workers_its_plan_uses() -> None:
    """Measured at a quarter core (docs/scheduler.md): the coordinator 1,424 MLP neurons/ms,
    its hub 0.15 ms per worker and 0.56 per round, workers ~1,350 and 0.9 ms round trips.
    The head alone: 16,384 neuron-equivalents, 11.5 ms; over 3 workers ~5 ms."""
    alone = head_ms_alone(VOCAB, 1424.0)
    assert alone == pytest.approx(11.5, abs=0.1)
    three = _workers(3, 1350.0, 0.9)
    split = head_ms_split(VOCAB, three, 0.15, 0.56)
    assert split == pytest.approx(VOCAB / 3 / 3 / 1350.0 + 0.9)
    out, record = head_workers(VOCAB, 1424.0, 0.0, 0.15, 0.56, [three], 0.15)
    assert out == [1, 2, 3]
    assert record == {"coordinator_ms": round(alone, 3), "split_ms": round(split, 3),
                      "workers": 3}


def test_a_fast_coordinator_keeps_the_head_when_rounds_cost_more() -> None:
    """A full-speed coordinator (5,370 neurons/ms: 3.1 ms for the head) against workers
    behind 3 ms round trips, or against a hub that costs more than the head: it keeps it."""
    assert head_workers(VOCAB, 5370.0, 0.0, 0.05, 0.3, [_workers(7, 5300.0, 3.0)], 0.15)[0] == []
    assert head_workers(VOCAB, 5370.0, 0.0, 0.5, 0.3, [_workers(7, 5300.0, 0.1)], 0.15)[0] == []
    # and hands it over when the round is cheap
    assert head_workers(VOCAB, 5370.0, 0.0, 0.05, 0.3, [_workers(7, 5300.0, 0.3)],
                        0.15)[0] == list(range(1, 8))


def test_the_split_must_be_hysteresis_faster_and_the_fastest_candidate_wins() -> None:
    alone = head_ms_alone(VOCAB, 1000.0)
    # one worker as fast as the coordinator, with a round trip: never 15% faster
    assert head_workers(VOCAB, 1000.0, 0.0, 0.0, 0.0, [_workers(1, 1000.0, 0.1)], 0.15)[0] == []
    two = _workers(2, 1000.0, 0.0)
    assert head_ms_split(VOCAB, two, 0.0, 0.0) == pytest.approx(alone / 2)
    assert head_workers(VOCAB, 1000.0, 0.0, 0.0, 0.0, [two], 0.51)[0] == []  # 51% asked: no
    assert head_workers(VOCAB, 1000.0, 0.0, 0.0, 0.0, [two], 0.5)[0] == [1, 2]
    four = _workers(4, 1000.0, 0.0)
    assert head_workers(VOCAB, 1000.0, 0.0, 0.0, 0.0, [two, four], 0.15)[0] == [1, 2, 3, 4]
    assert head_workers(VOCAB, 1000.0, 0.0, 0.0, 0.0, [[], []], 0.15) == \
        ([], {"coordinator_ms": round(alone, 3), "workers": 0})


CFG = ModelConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, n_layers=2,
                  n_heads=4, n_kv_heads=2, head_dim=2)


def _planner(placement: str, head: str | None) -> tuple[Planner, list[WorkerLink],
                                                         Placement]:
    """A planner of the given policy whose coordinator is CPU-capped (the quarter-core
    figures above) and three live workers with measured profiles and round trips; the plan
    gives workers 1 and 2 groups and worker 3 none."""
    opts = ClusterOptions()
    opts.plan.placement, opts.plan.head = placement, head
    partition = Partition.contiguous(CFG, 2, 4)
    coordinator = DeviceProfile("coordinator", 1424.0, 1 << 30, hub_ms=0.15, hub_round_ms=0.56)
    p = Planner(opts, partition, {g: 1.0 for g in partition.groups()}, CFG, torch.float32,
                coordinator, lambda _msg: None)
    links = [WorkerLink(i, "127.0.0.1", i, alive=True) for i in (1, 2, 3)]
    for lk in links:
        lk.profile = DeviceProfile(f"w{lk.index}", 1350.0, 1 << 30)
        lk.estimate = LinkEstimate()
        lk.estimate.probe_ms = 0.3
    split = equal_plan(partition, 3)  # devices 0, 1 and 2
    plan = Placement(partition, dict(split.owner), frozenset(), 4)
    return p, links, plan


def test_the_policies_decide_who_computes_the_head() -> None:
    p, links, plan = _planner("halo", None)
    assert p.head_workers(plan, links) == [1, 2]  # the workers the plan uses, not the idle one
    assert p.head is not None and p.head["workers"] == 2
    alone = Placement(plan.partition, dict.fromkeys(plan.partition.groups(), 0), frozenset(), 4)
    assert p.head_workers(alone, links) == []  # no worker in the plan: the head stays
    links[1].estimate.miss_rate = 0.05  # a lossy link: a head round would wait for it, and
    assert p.head_workers(plan, links) == []  # the reliable one alone is not worth a round
    links[1].estimate.miss_rate = 0.0
    links[0].alive = False  # one worker as fast as the coordinator is not worth a round
    assert p.head_workers(plan, links) == [] and p.head["workers"] == 0
    assert _planner("halo", "coordinator")[0].head_workers(plan, links) == []
    p, links, plan = _planner("workers", None)
    assert p.head_workers(plan, links) == [1, 2, 3]  # every live worker, as before
    p, links, plan = _planner("equal", None)
    assert p.head_workers(plan, links) == []
    p, links, plan = _planner("equal", "workers")
    assert p.head_workers(plan, links) == [1, 2, 3]
