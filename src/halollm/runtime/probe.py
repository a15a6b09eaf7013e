"""What a round will cost, measured through the real links before the first plan.

The scheduler's first plan used to guess two costs it only learns from live rounds: each
link's round trip (0.5 ms) and the coordinator's own work per worker in a round (0.05 ms).
On slow or CPU-capped devices both guesses were several times too low, so the first plan
spread the model over every worker and the planner then paid seconds per move to undo it.
The probe sends empty rounds (phase PROBE: a worker answers at once with zeros) first to
each worker alone, timing the round trip, then to all of them together, timing the
coordinator's CPU for encoding, sealing, sending, receiving, opening, decoding and summing.
CPU time divided by the share of a core the process gets (its compute benchmark measured
that) is what the hub work costs in wall-clock time on a CPU quota, which a short probe
would otherwise run through within one quota period.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from halollm.model.llama import sum_partials
from halollm.runtime.links import WorkerLink
from halollm.runtime.protocol import PARTIAL, PROBE, ProtocolError, RoundTag
from halollm.runtime.rounds import Transport
from halollm.runtime.tensor_codec import decode_body, encode_body

ALONE_ROUNDS = 5  # per worker, for its round trip
TOGETHER_ROUNDS = 16  # all workers at once, for the coordinator's per-worker cost
TIMEOUT_S = 1.0  # an answer later than this is not waited for (the link is lossy or slow)


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


def probe_links(transport: Transport, links: list[WorkerLink], session: int, wire: int,
                dim: int, cpu_share: float = 1.0) -> ProbeResult:
    """Probe rounds over `links` (live ones); see the module docstring."""
    result = ProbeResult()
    live = [lk for lk in links if lk.alive]
    if not live:
        return result
    x = torch.zeros(1, dim)
    number = 0
    rtts: dict[int, list[float]] = {lk.index: [] for lk in live}
    alone: list[float] = []  # CPU seconds of rounds with one worker
    for _ in range(ALONE_ROUNDS):
        for link in live:
            number += 1
            answered, cpu = _round(transport, [link], RoundTag(session, 0, 0, number, 1, 0,
                                                               PROBE), wire, x, dim)
            result.missed += 1 - len(answered)
            for ms in answered.values():
                rtts[link.index].append(ms)
                alone.append(cpu)
    result.rtt_ms = {i: statistics.median(v) for i, v in rtts.items() if v}
    together: list[float] = []  # CPU seconds of rounds with every worker, all answering
    for _ in range(TOGETHER_ROUNDS):
        number += 1
        answered, cpu = _round(transport, live, RoundTag(session, 0, 0, number, 1, 0, PROBE),
                               wire, x, dim)
        result.missed += len(live) - len(answered)
        if len(answered) == len(live):
            together.append(cpu)
    # CPU per round = fixed + per_worker * n, from n = 1 and n = all (one worker: per
    # worker only); CPU seconds over the core's share = wall-clock milliseconds
    scale = 1e3 / max(cpu_share, 1e-3)
    one = statistics.median(alone) if alone else None
    if together and len(live) > 1:
        every = statistics.median(together)
        per_worker = every / len(live) if one is None else \
            max(0.0, (every - one) / (len(live) - 1))
        result.hub_ms = scale * per_worker
        result.round_ms = None if one is None else scale * max(0.0, one - per_worker)
    elif one is not None:
        result.hub_ms = scale * one
    return result


def _round(transport: Transport, targets: list[WorkerLink], tag: RoundTag, wire: int,
           x: torch.Tensor, dim: int) -> tuple[dict[int, float], float]:
    """One probe round: (round trip in ms per worker that answered, the process's CPU
    seconds in the round: the hub work, as blocking waits cost none -- the transport must
    not spin)."""
    c0 = time.process_time()
    transport.send(tag, wire, encode_body(x, wire), targets)
    sent = time.perf_counter()
    pending = {t.index: t for t in targets}
    answered: dict[int, float] = {}
    parts: list[torch.Tensor] = []
    end = sent + TIMEOUT_S
    while pending and (left := end - time.perf_counter()) > 0:
        arrivals = transport.wait(left, pending)
        now = time.perf_counter()
        for a in arrivals:
            if a.kind != PARTIAL or a.tag != tag or a.sender not in pending:
                continue
            try:
                _, part = decode_body(a.body, a.wire, 1, dim)
            except ProtocolError:
                continue
            pending.pop(a.sender)
            answered[a.sender] = 1e3 * (now - sent)
            parts.append(part)
    if parts:
        sum_partials(parts)
    return answered, time.process_time() - c0
