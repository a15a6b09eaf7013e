"""Synchronisation rounds: one layer half, across the coordinator and its workers.

A round sends the layer input to the workers holding groups of that half, computes the
coordinator's own share while they compute theirs, and gathers their partial updates. Strict
mode and relaxed mode are two transports behind one interface (TCP through ZeroMQ, every
contribution awaited; tagged UDP datagrams, a deadline); what to do with the contributions
still pending at each moment is round_decision.decide, a pure function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import zmq

from halollm.model.llama import sum_partials
from halollm.runtime import protocol
from halollm.runtime.deadline import DeadlineEstimator
from halollm.runtime.links import Links, WorkerLink
from halollm.runtime.partials import Output, Taken
from halollm.runtime.protocol import (
    ACTIVATION,
    ATTN,
    HEAD,
    MLP,
    PARTIAL,
    PROBE,
    ProtocolError,
    RoundTag,
)
from halollm.runtime.round_decision import Act, RoundState, decide, next_retry_interval
from halollm.runtime.stats import SyncStats
from halollm.runtime.tensor_codec import check_body, decode_body, encode_body
from halollm.runtime.transport import Message, UdpEndpoint

PHASES = {"attn": ATTN, "mlp": MLP, "probe": PROBE}  # probe: probe.py's rounds
CONTROL_EVERY_S = 0.005  # how often a relaxed round drains the control plane
REMEMBERED = 512  # rounds whose send time is kept, to learn from late arrivals
HUB_ALPHA = 0.05  # weight of the newest round in the coordinator's per-worker cost


class WorkerLost(Exception):  # noqa: N818 (an event the coordinator handles, not an error)
    """A critical contribution's worker has been silent past the death threshold."""

    def __init__(self, links: list[WorkerLink]) -> None:
        super().__init__(", ".join(link.name for link in links))
        self.links = links


class Transport(Protocol):
    can_retry: bool
    busy_s: float  # time spent receiving and opening what arrived (not waiting for it)
    wakeups: int  # times datagrams woke a wait in C (the native path; else 0)

    def send(self, tag: RoundTag, wire: int, body: bytes, targets: Sequence[WorkerLink]
             ) -> None: ...

    def gather(self, tag: RoundTag, targets: list[WorkerLink], wire: int, dim: int,
               spans: list[tuple[int, int]] | None = None) -> object | None: ...

    def wait(self, timeout: float, pending: dict[int, WorkerLink], gather: object | None = None
             ) -> list[Message]: ...


class UdpTransport:
    """Relaxed mode: tagged, fragmented datagrams; the control plane drained in between."""

    can_retry = True

    def __init__(self, udp: UdpEndpoint, links: Links, spin_s: float = 0.0) -> None:
        self.udp, self.links, self.spin_s = udp, links, spin_s
        self.busy_s = 0.0

    @property
    def wakeups(self) -> int:
        return self.udp.wakeups

    def send(self, tag: RoundTag, wire: int, body: bytes, targets: Sequence[WorkerLink]
             ) -> None:
        self.udp.send(ACTIVATION, 0, wire, tag, body, [(t.udp_addr, t.data) for t in targets])

    def gather(self, tag: RoundTag, targets: list[WorkerLink], wire: int, dim: int,
               spans: list[tuple[int, int]] | None = None) -> object | None:
        """The native path's taker of this round's partials, if it runs here."""
        return self.udp.gather(tag, [t.index for t in targets], [t.data for t in targets],
                               wire, dim, spans)

    def wait(self, timeout: float, pending: dict[int, WorkerLink], gather: object | None = None
             ) -> list[Message]:
        out: list[Message] = []
        if gather is not None and not self.spin_s:  # the wait itself in C
            t, slept = time.perf_counter(), self.udp.slept_s
            out = self.udp.receive(gather=gather, timeout=timeout)
            self.busy_s += time.perf_counter() - t - (self.udp.slept_s - slept)
        elif self.udp.readable(timeout, self.spin_s):
            t = time.perf_counter()
            out = self.udp.receive(gather=gather)
            self.busy_s += time.perf_counter() - t
        if time.perf_counter() - self.links.last_poll > CONTROL_EVERY_S:
            self.links.poll()
        return out


class TcpTransport:
    """Strict mode: one frame per message on each worker's ZeroMQ connection (TCP)."""

    can_retry = False
    wakeups = 0

    def __init__(self, links: Links, stats: SyncStats) -> None:
        self.links, self.stats = links, stats
        self.busy_s = 0.0
        self._pollers: dict[tuple[tuple[int, int], ...], zmq.Poller] = {}  # per pending set

    def send(self, tag: RoundTag, wire: int, body: bytes, targets: Sequence[WorkerLink]
             ) -> None:
        for t in targets:  # sealed for each worker's link
            t.sock.send(protocol.encode(ACTIVATION, 0, wire, tag, body, t.data, mtu=1 << 30)[0])

    def gather(self, tag: RoundTag, targets: list[WorkerLink], wire: int, dim: int,
               spans: list[tuple[int, int]] | None = None) -> object | None:
        return None  # every partial through _on_partial

    def wait(self, timeout: float, pending: dict[int, WorkerLink], gather: object | None = None
             ) -> list[Message]:
        key = tuple((i, id(lk.sock)) for i, lk in pending.items())  # a rejoin's new socket
        poller = self._pollers.get(key)
        if poller is None:
            if len(self._pollers) > 64:
                self._pollers.clear()
            poller = self._pollers[key] = zmq.Poller()
            for link in pending.values():
                poller.register(link.sock, zmq.POLLIN)
        out: list[Message] = []
        for sock, _ in poller.poll(max(1, int(timeout * 1000))):
            t = time.perf_counter()
            link = next(lk for lk in pending.values() if lk.sock is sock)
            self.links.drain(link, lambda _link, data: self._decode(data, out))
            self.busy_s += time.perf_counter() - t
        return out

    def _decode(self, data: bytes, out: list[Message]) -> None:
        try:
            f = protocol.decode(data, self.links.data_channel)
        except ProtocolError as exc:
            self.stats.datagrams[exc.reason] += 1
            return
        out.append(Message(f.kind, f.sender, f.wire, f.tag, f.payload, None))


Criticality = Callable[[int, str, torch.Tensor, list[WorkerLink]], set[int]]
Recompute = Callable[[WorkerLink, RoundTag, torch.Tensor], torch.Tensor]


class Rounds:
    """Runs rounds. `critical(layer, half, x, targets)` names the workers whose contribution
    must arrive; `recompute(link, tag, x)` computes a missing critical MLP contribution."""

    def __init__(self, transport: Transport, links: Links, session: int, wire: int, dim: int,
                 deadline: DeadlineEstimator, stats: SyncStats, critical: Criticality,
                 recompute: Recompute) -> None:
        self.transport, self.links, self.session, self.wire = transport, links, session, wire
        self.dim, self.deadline, self.stats = dim, deadline, stats
        self.critical, self.recompute = critical, recompute
        self.epoch = self.request = 0
        self.head_deadline = DeadlineEstimator(fixed_ms=deadline.fixed_ms)  # its own delays
        self.sent_at: dict[RoundTag, float] = {}
        self.retried: set[RoundTag] = set()
        self.sent_wall = 0.0  # when the current round's activation went out
        self.hub_ms: float | None = None  # the coordinator's own ms per worker in a round
        self.hub_round_ms = 0.0  # ... and per round with any worker (probed; not learned)
        self._partials_s = 0.0  # time spent taking partials in
        self._sums = Output(wire, dim)  # what a layer round's partials make

    def run(self, layer: int, half: str, x: torch.Tensor, start: int, shards: Sequence,
            targets: list[WorkerLink]) -> torch.Tensor:
        """The float32 update of one layer half: own shards plus the workers' partials."""
        tag = RoundTag(self.session, self.epoch, self.request, start, x.shape[0], layer,
                       PHASES[half])
        t0 = time.perf_counter()
        busy, taking, woken = self.transport.busy_s, self._partials_s, self.transport.wakeups
        body, send_cpu, c2 = b"", 0.0, 0.0  # CPU clocks only for rounds with workers
        if targets:
            c0 = time.process_time()
            body = encode_body(x, self.wire)
            self.transport.send(tag, self.wire, body, targets)
            send_cpu = time.process_time() - c0
        self.sent_wall = t1 = time.perf_counter()
        partials = [s.forward(x, start) for s in shards]
        t2 = time.perf_counter()
        if targets:
            c2 = time.process_time()
            partials += self.gather(tag, half, targets, x, body)
        t3 = time.perf_counter()
        self.stats.rounds += 1
        out = sum_partials(partials) if partials else torch.zeros(x.shape[0], self.dim)
        stage = self.stats.stage_ms  # send (encode, seal, sendto), own share, gather, sum
        stage["send"] += 1e3 * (t1 - t0)
        stage["own"] += 1e3 * (t2 - t1)
        stage["gather"] += 1e3 * (t3 - t2)
        t4 = time.perf_counter()
        stage["sum"] += 1e3 * (t4 - t3)
        if targets and tag.ntok == 1:  # decode rounds: what the plan is made for
            self.stats.hub_cpu_ms += 1e3 * (time.process_time() - c2 + send_cpu)
            self.stats.hub_rounds += 1
            self.stats.hub_workers += len(targets)
            self.stats.hub_wakeups += self.transport.wakeups - woken
            hub = (t1 - t0) + (self.transport.busy_s - busy) + (self._partials_s - taking) + \
                (t4 - t3)
            self._observe_hub(max(0.0, 1e3 * hub - self.hub_round_ms) / len(targets))
        return out

    def head(self, x: torch.Tensor, pos: int, targets: list[WorkerLink],
             spans: dict[int, tuple[int, int]], vocab: int, wire: int) -> torch.Tensor:
        """float32 logits [1, vocab] of the normed last hidden state x [1, d], the LM head's
        rows computed by `targets` (spans: per worker, its first row and row count) and
        placed side by side; a missing worker's rows are computed here (`recompute`)."""
        t0 = time.perf_counter()
        tag = RoundTag(self.session, self.epoch, self.request, pos, 1, 0, HEAD)
        body = encode_body(x, wire)
        self.transport.send(tag, wire, body, targets)
        parts = self.gather(tag, "head", targets, x, body, Output(wire, vocab, spans))
        logits = sum_partials(parts)
        self.stats.head_rounds += 1
        self.stats.head_ms += 1e3 * (time.perf_counter() - t0)
        return logits

    def _observe_hub(self, ms: float) -> None:
        """Sending to, receiving from and summing one worker, as it costs the coordinator
        (wall clock: a CPU quota's stalls land in it as they land in compute)."""
        self.hub_ms = ms if self.hub_ms is None else self.hub_ms + HUB_ALPHA * (ms - self.hub_ms)

    def _remember(self, tag: RoundTag, sent: float) -> None:
        self.sent_at[tag] = sent
        if len(self.sent_at) > REMEMBERED:
            self.sent_at.pop(next(iter(self.sent_at)))
        if len(self.retried) > REMEMBERED:
            self.retried.clear()

    def _deadline(self, tag: RoundTag) -> DeadlineEstimator:
        return self.head_deadline if tag.phase == HEAD else self.deadline

    def gather(self, tag: RoundTag, half: str, targets: list[WorkerLink], x: torch.Tensor,
               body: bytes, out: Output | None = None) -> list[torch.Tensor]:
        """Collect the workers' partials: recomputed ones, and the sum of those that
        arrived (decoded together at the end, or summed in C as they came: `native`). The
        deadline counts from the end of the coordinator's own share (what matters is how
        long the coordinator idles)."""
        sent = time.perf_counter()
        out = out or self._sums
        pending = {t.index: t for t in targets}
        spans = None if out.spans is None else [out.spans[t.index] for t in targets]
        got = Taken(self.transport.gather(tag, targets, out.wire, out.dim, spans))
        self.stats.expected += len(pending)
        self._remember(tag, sent)
        deadline = sent + self._deadline(tag).deadline_ms(tag.ntok) / 1e3
        critical: frozenset[int] | None = None
        interval, next_retry = max(deadline - sent, 1e-3), deadline
        relaxed = self.transport.can_retry
        try:
            while True:
                now = time.perf_counter()
                silent = frozenset(i for i, lk in pending.items() if self.links.silent(lk)) \
                    if critical is not None else frozenset()
                d = decide(RoundState(now, deadline, frozenset(pending), critical, silent,
                                      relaxed, tag.phase in (MLP, HEAD), next_retry))
                if d.act in (Act.DONE, Act.GIVE_UP):
                    break
                if d.act is Act.CLASSIFY:
                    critical = self._classify(tag, half, x, targets, pending)
                elif d.act is Act.RECOMPUTE:
                    got.drop(d.devices)
                    got.tensors += [self.recompute(pending.pop(i), tag, x)
                                    for i in sorted(d.devices)]
                elif d.act is Act.WORKER_LOST:  # run again after the takeover
                    self.stats.recomputed += len(d.devices)
                    raise WorkerLost([pending.pop(i) for i in sorted(d.devices)])
                elif d.act is Act.RETRY:
                    self.transport.send(tag, out.wire, body, [pending[i] for i in d.devices])
                    self.stats.retries += len(d.devices)
                    self.retried.add(tag)
                    interval = next_retry_interval(interval)
                    next_retry = now + interval
                else:
                    arrivals = self.transport.wait(d.timeout, pending, got.native)
                    t = time.perf_counter()
                    arrived = got.arrived()
                    if arrived:
                        self._arrivals([(pending.pop(i), at) for i, at in arrived], tag, sent)
                    for a in arrivals:
                        self._on_partial(a, tag, pending, got, sent, out)
                    self._partials_s += time.perf_counter() - t
        finally:
            self.stats.waited_ms += 1e3 * (time.perf_counter() - sent)
            self.stats.lost += len(pending)
        t = time.perf_counter()
        partials = got.partials(out, tag.ntok)
        self._partials_s += time.perf_counter() - t
        return partials

    def _classify(self, tag: RoundTag, half: str, x: torch.Tensor,
                  targets: list[WorkerLink], pending: dict[int, WorkerLink]) -> frozenset[int]:
        if tag.ntok == 1 and tag.phase in (ATTN, MLP):  # what the scheduler learns: missed
            for link in pending.values():
                link.estimate.observe(False)
        if not self.transport.can_retry or tag.ntok > 1 or tag.phase == HEAD:
            # strict mode, prompt rounds (their hidden states feed every later token), and
            # the LM head's rows (every logit counts)
            critical = frozenset(t.index for t in targets)
        else:
            critical = frozenset(self.critical(tag.layer, half, x, targets))
        if critical & pending.keys():
            self.stats.critical_waits += 1
        return critical

    def _on_partial(self, a: Message, tag: RoundTag, pending: dict[int, WorkerLink],
                    got: Taken, sent: float, out: Output) -> None:
        now = time.perf_counter()
        if a.kind != PARTIAL:
            self.stats.datagrams["unexpected_kind"] += 1
            return
        if a.tag != tag or a.sender not in pending:
            earlier = self.sent_at.get(a.tag)
            if earlier is not None and a.tag.session == self.session:
                self.stats.late += 1
                if a.tag not in self.retried:  # a retry's answer says nothing of delay
                    self._deadline(a.tag).observe(1e3 * (now - earlier))
            else:
                self.stats.datagrams["stale"] += 1
            return
        try:  # checked now (a bad body leaves its sender pending), decoded with the rest
            n = out.length(a.sender)
            if a.wire == out.wire:
                got.bodies.append((a.body, check_body(a.body, a.wire, tag.ntok, n), a.sender))
            elif out.spans is None:
                got.tensors.append(decode_body(a.body, a.wire, tag.ntok, n)[1])
            else:  # the LM head's rows come in the compute dtype's wire, never another
                raise ProtocolError("malformed", f"head rows in wire {a.wire}")
        except ProtocolError as exc:
            self.stats.datagrams[exc.reason] += 1
            return
        self._arrivals([(pending.pop(a.sender), now)], tag, sent)

    def _arrivals(self, links_at: list[tuple[WorkerLink, float]], tag: RoundTag, sent: float
                  ) -> None:
        """Workers' partials of this round are in, each (link, when: perf_counter clock)."""
        seen = time.monotonic()
        self.stats.received += len(links_at)
        learn = tag.ntok == 1 and tag.phase != PROBE  # probes: answered at once, no compute
        # in time (an answer to a retry was a miss): what the scheduler learns of layer rounds
        scheduled = learn and tag not in self.retried and tag.phase != HEAD
        deadline, wall = self._deadline(tag), self.sent_wall
        for link, at in links_at:
            link.last_seen = seen
            if learn:
                deadline.observe(1e3 * (at - sent))
                if scheduled:
                    link.estimate.observe(True, 1e3 * (at - wall))
