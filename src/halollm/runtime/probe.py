"""What a round will cost, measured through the real links before the first plan.

The scheduler's first plan used to guess two costs it only learns from live rounds: each
link's round trip (0.5 ms) and the coordinator's own work per worker in a round (0.05 ms).
On slow or CPU-capped devices both guesses were several times too low, so the first plan
spread the model over every worker and the planner then paid seconds per move to undo it.

The probe sends empty rounds (phase PROBE: a worker answers at once with zeros): first to
each worker alone, timing the round trip; then through the real round code (`Rounds.run`,
what every decode round runs: encode, seal, send, the coordinator's own share, gather,
decide, open, decode, sum) to one worker and to all of them in turn, with a real MLP shard
computed as the coordinator's own share. The coordinator's CPU for everything but that
share (`SyncStats.hub_cpu_ms`, the figure `sync.hub_cpu` reports live) at one worker and at
all of them gives its cost per round and per worker. The compute in between matters: it
streams weights through the caches the round's Python runs from, and a probe without it
measured 2.3-3.2x less than live rounds cost (docs/results/fallbacks.md). CPU time divided
by the share of a core the process gets (its compute benchmark measured that) is what the
hub work costs in wall-clock time on a CPU quota, which a short probe would otherwise run
through within one quota period.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from halollm.runtime.deadline import DeadlineEstimator
from halollm.runtime.links import Links, WorkerLink
from halollm.runtime.protocol import PARTIAL, PROBE, ProtocolError, RoundTag
from halollm.runtime.rounds import Rounds, Transport, WorkerLost
from halollm.runtime.stats import SyncStats
from halollm.runtime.tensor_codec import decode_body, encode_body

ALONE_ROUNDS = 5  # per worker, for its round trip
TOGETHER_ROUNDS = 16  # through the real round code, at one worker and at all of them
TIMEOUT_S = 1.0  # an answer later than this is not waited for (the link is lossy or slow)
PROBE_DEADLINE_MS = 50.0  # at least; else 3x the slowest round trip before a re-send


@dataclass
class ProbeResult:
    rtt_ms: dict[int, float] = field(default_factory=dict)  # median round trip per worker
    hub_ms: float | None = None  # the coordinator's cost per worker and round
    round_ms: float | None = None  # ... and per round with any worker, besides that
    missed: int = 0  # probes never answered

    def to_json(self) -> dict:
        return {"rtt_ms": {str(k): round(v, 3) for k, v in self.rtt_ms.items()},
                "hub_ms_per_worker": None if self.hub_ms is None else round(self.hub_ms, 4),
                "hub_ms_per_round": None if self.round_ms is None else round(self.round_ms, 4),
                "missed": self.missed}


def probe_links(transport: Transport, links_of: Links, session: int, wire: int, dim: int,
                own: Sequence[Any] = (), cpu_share: float = 1.0) -> ProbeResult:
    """Probe rounds over the live links; `own`: what the coordinator computes in each round
    of the hub measurement (shards with `forward(x, start)`). See the module docstring."""
    result = ProbeResult()
    live = links_of.alive()
    if not live:
        return result
    x = torch.zeros(1, dim)
    number = 0
    rtts: dict[int, list[float]] = {lk.index: [] for lk in live}
    for _ in range(ALONE_ROUNDS):
        for link in live:
            number += 1
            answered = _round(transport, [link], RoundTag(session, 0, 0, number, 1, 0, PROBE),
                              wire, x, dim)
            result.missed += 1 - len(answered)
            rtts[link.index] += answered.values()
    result.rtt_ms = {i: statistics.median(v) for i, v in rtts.items() if v}
    wait_ms = max(PROBE_DEADLINE_MS, 3 * max(result.rtt_ms.values(), default=TIMEOUT_S * 1e3))
    one, every, lost = _hub_cpu(transport, links_of, live, session, wire, dim, own, number,
                                  wait_ms)
    result.missed += lost
    # CPU per round = fixed + per_worker * n, from n = 1 and n = all; CPU milliseconds over
    # the core's share = wall-clock milliseconds
    scale = 1.0 / max(cpu_share, 1e-3)
    if one is not None and every is not None and len(live) > 1:
        per_worker = max(0.0, (every - one) / (len(live) - 1))
        result.hub_ms = scale * per_worker
        result.round_ms = scale * max(0.0, one - per_worker)
    elif one is not None:
        result.hub_ms = scale * one
        result.round_ms = 0.0
    return result


def _hub_cpu(transport: Transport, links: Links, live: list[WorkerLink], session: int,
             wire: int, dim: int, own: Sequence[Any], number: int, wait_ms: float
             ) -> tuple[float | None, float | None, int]:
    """The coordinator's CPU ms per round, own share left out, at one worker and at all of
    `live` (None where no round completed), and how many answers never came: PROBE rounds
    through `Rounds.run`, the two sizes interleaved, `own` computed in each as the
    coordinator's share. A missing answer is asked for again after `wait_ms`, as a live
    round asks for a critical one."""
    runs = [(Rounds(transport, links, session, wire, dim, DeadlineEstimator(fixed_ms=wait_ms),
                    SyncStats(mode="probe"), _everyone, _no_recompute), targets)
            for targets in ([live[0]], live)]
    x = torch.zeros(1, dim)
    silent = 0
    try:
        for _ in range(TOGETHER_ROUNDS):
            for rounds, targets in runs:
                number += 1
                rounds.run(0, "probe", x, number, own, targets)
    except WorkerLost as exc:  # silent past the death threshold: price from what completed
        silent = len(exc.links)
    out = [r.stats.hub_cpu_ms / r.stats.hub_rounds if r.stats.hub_rounds else None
           for r, _ in runs]
    return out[0], out[1], silent + sum(r.stats.lost for r, _ in runs)


def _everyone(_layer: int, _half: str, _x: torch.Tensor, targets: list[WorkerLink]
              ) -> set[int]:
    return {t.index for t in targets}


def _no_recompute(link: WorkerLink, tag: RoundTag, x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("probe rounds are not MLP rounds")  # decide() never asks


def _round(transport: Transport, targets: list[WorkerLink], tag: RoundTag, wire: int,
           x: torch.Tensor, dim: int) -> dict[int, float]:
    """One probe round: the round trip in ms of each worker that answered."""
    transport.send(tag, wire, encode_body(x, wire), targets)
    sent = time.perf_counter()
    pending = {t.index: t for t in targets}
    answered: dict[int, float] = {}
    end = sent + TIMEOUT_S
    while pending and (left := end - time.perf_counter()) > 0:
        arrivals = transport.wait(left, pending)
        now = time.perf_counter()
        for a in arrivals:
            if a.kind != PARTIAL or a.tag != tag or a.sender not in pending:
                continue
            try:
                decode_body(a.body, a.wire, 1, dim)
            except ProtocolError:
                continue
            pending.pop(a.sender)
            answered[a.sender] = 1e3 * (now - sent)
    return answered
