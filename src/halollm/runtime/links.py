"""The coordinator's links to its workers: connect, join, heartbeats, control messages in and
out. Links report what happened (a worker went silent, one came back, one needs KV repair) as
events; they do not act on them -- the coordinator applies every change between tokens."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from halollm.errors import HaloError
from halollm.runtime import handshake, protocol
from halollm.runtime.channel import Channel
from halollm.runtime.handshake import LinkChannels
from halollm.runtime.keys import ClusterKey
from halollm.runtime.liveness import PeerWatch
from halollm.runtime.messages import (
    WRONG_KEY,
    Challenge,
    Heartbeat,
    Join,
    Message,
    Need,
    Refused,
    Welcome,
    decode,
    encode,
    encode_clear,
    harden,
)
from halollm.runtime.options import LinkOptions
from halollm.runtime.protocol import ProtocolError
from halollm.runtime.stats import SyncStats
from halollm.runtime.transport import Address, local_address_towards
from halollm.scheduler.profile import DeviceProfile, LinkEstimate, available_memory_bytes


@dataclass
class WorkerLink:
    index: int  # the worker's device number (the coordinator is 0)
    host: str
    port: int
    sock: Any = None
    alive: bool = False
    last_seen: float = 0.0
    last_attempt: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    heartbeat: dict[str, Any] = field(default_factory=dict)
    profile: DeviceProfile | None = None
    estimate: LinkEstimate = field(default_factory=LinkEstimate)
    channels: LinkChannels | None = None  # this session's keys, once the worker joined
    watch: PeerWatch | None = None  # tells when the worker's TCP connection drops

    @property
    def disconnected(self) -> bool:
        """Its connection is down, as last seen (by `Links.await_reply`)."""
        return self.watch is not None and self.watch.down

    @property
    def control(self) -> Channel | None:
        return None if self.channels is None else self.channels.control

    @property
    def data(self) -> Channel:
        assert self.channels is not None, "a link is used before its join"
        return self.channels.data

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def udp_addr(self) -> Address:
        return (self.host, self.port)


@dataclass(frozen=True)
class Dead:
    link: WorkerLink
    reason: str


@dataclass(frozen=True)
class Rejoined:
    link: WorkerLink


@dataclass(frozen=True)
class RepairNeeded:
    link: WorkerLink
    request: int
    layer: int
    positions: list[int]


Event = Dead | Rejoined | RepairNeeded
DataHandler = Callable[[WorkerLink, bytes], None]


class Links:
    def __init__(self, addresses: Sequence[Address], key: ClusterKey, session: int,
                 model_hash: str,
                 udp_port: int, opts: LinkOptions, stats: SyncStats,
                 log: Callable[[str], None], weight_format: str = "") -> None:
        self.key, self.session, self.model_hash = key, session, model_hash
        self.weight_format = weight_format
        self.udp_port, self.opts, self.stats, self.log = udp_port, opts, stats, log
        self.ctx = zmq.Context.instance()
        self.links = [WorkerLink(i + 1, h, p) for i, (h, p) in enumerate(addresses)]
        self._by_index = {link.index: link for link in self.links}
        self.events: list[Event] = []
        self.last_poll = 0.0
        self._poller: tuple[tuple[Any, ...], zmq.Poller, dict[Any, WorkerLink]] | None = None

    def __iter__(self) -> Iterator[WorkerLink]:
        return iter(self.links)

    def alive(self) -> list[WorkerLink]:
        return [link for link in self.links if link.alive]

    def send(self, link: WorkerLink, msg: Message, flags: int = 0) -> None:
        assert link.channels is not None, "a sealed message before the join"
        link.sock.send_multipart(encode(link.channels.control, msg), flags)

    def data_channel(self, sender: int, session: int) -> Channel | None:
        """The data channel a datagram from `sender` in `session` must open with."""
        link = self._by_index.get(sender)
        if session != self.session or link is None or link.channels is None:
            return None
        return link.channels.data

    def silent(self, link: WorkerLink) -> bool:
        return time.monotonic() - link.last_seen > self.opts.dead_after_s

    # -- joining -------------------------------------------------------------------------
    def join_all(self) -> None:
        for link in self.links:
            if not self._join(link, self.opts.join_timeout_s):
                raise HaloError(f"worker {link.name} did not answer within "
                                f"{self.opts.join_timeout_s:.0f}s (is `halo worker` running "
                                "there, and reachable?)")

    def _join(self, link: WorkerLink, timeout_s: float) -> bool:
        """The challenge-response join (handshake.py). False if the worker did not answer
        in time; HaloError if it refused or could not prove it holds the key."""
        if link.sock is not None:
            self._close(link, 0)
        link.sock = self.ctx.socket(zmq.DEALER)
        link.sock.setsockopt(zmq.LINGER, 0)
        harden(link.sock)
        link.sock.connect(f"tcp://{link.host}:{link.port}")
        link.channels = None
        hello, nonce = handshake.hello(self.session)
        link.sock.send_multipart(encode_clear(hello))
        challenge = self._answer(link, Challenge, timeout_s)
        if not isinstance(challenge, Challenge):
            return False
        try:
            link.channels = handshake.coordinator_channels(self.key, nonce, challenge)
        except ProtocolError as exc:
            raise HaloError(f"worker {link.name} sent a malformed challenge ({exc})") from exc
        udp_host = local_address_towards(link.host, link.port)
        self.send(link, Join(self.session, self.model_hash, [udp_host, self.udp_port],
                             self.weight_format, link.index))
        welcome = self._answer(link, Welcome, timeout_s)
        if not isinstance(welcome, Welcome):
            return False
        # watched from here on: a drop while joining is ZeroMQ's to retry (a busy worker's
        # missed ZMTP heartbeats, say), not a reason to give the join up
        link.watch = PeerWatch(link.sock)
        self._welcomed(link, welcome)
        return True

    def _answer(self, link: WorkerLink, kind: type[Message], timeout_s: float
                ) -> Message | None:
        """The worker's answer of `kind` in a join (None: no answer in time); a refusal is
        a HaloError naming its reason."""
        reply = self.await_reply(link, (kind, Refused), timeout_s)
        if isinstance(reply, Refused):
            hint = " (give both sides the same --key or HALO_KEY)" \
                if reply.reason == WRONG_KEY else ""
            raise HaloError(f"worker {link.name} refused to join: {reply.reason}{hint}")
        return reply

    def _welcomed(self, link: WorkerLink, reply: Welcome) -> None:
        link.alive, link.last_seen = True, time.monotonic()
        link.info = {"cores": reply.cores, "threads": reply.threads}
        if link.profile is None:
            link.profile = DeviceProfile(link.name, reply.speed,
                                         reply.memory or available_memory_bytes(),
                                         load_speed=reply.load_speed)

    def await_reply(self, link: WorkerLink, kinds: tuple[type[Message], ...], timeout_s: float
                    ) -> Message | None:
        """Block for a control message of one of `kinds` from link (others are handled);
        None after `timeout_s`, or at once when the worker's connection drops (a worker
        killed while it builds a plan sends no heartbeat either way: `link.disconnected`)."""
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not link.sock.poll(int(min(left, 0.25) * 1000) + 1):
                if link.watch is not None and link.watch.dropped():
                    return None
                continue
            frames = link.sock.recv_multipart()
            if len(frames) == 1 and frames[0][:2] == protocol.MAGIC:
                self.stats.late += 1  # a strict-mode partial of a round already closed
                continue
            msg = self._decode(link, frames)
            if msg is None or getattr(msg, "session", None) not in (None, self.session):
                continue
            if isinstance(msg, kinds):
                link.last_seen = time.monotonic()
                return msg
            self._on_message(link, msg)
        return None

    # -- traffic -------------------------------------------------------------------------
    def _decode(self, link: WorkerLink, frames: list[bytes]) -> Message | None:
        try:
            return decode(frames, link.control)
        except ProtocolError as exc:
            self.stats.datagrams[exc.reason] += 1
            return None

    def drain(self, link: WorkerLink, on_data: DataHandler | None = None) -> None:
        """Everything waiting on link's socket: data frames (strict mode) to on_data (or
        counted late), control messages handled. Asks the socket whether a message waits
        before reading (a read that finds none raises zmq.Again, which costs more: the
        control plane is drained this way every few milliseconds, mostly empty)."""
        sock = link.sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 1 and frames[0][:2] == protocol.MAGIC:
                if on_data is not None:
                    on_data(link, frames[0])
                else:
                    self.stats.late += 1  # a strict-mode partial of a closed round
                continue
            msg = self._decode(link, frames)
            if msg is None or getattr(msg, "session", None) != self.session:
                continue
            link.last_seen = time.monotonic()
            self._on_message(link, msg)

    def poll(self) -> None:
        """Drain the links with something waiting: one zmq poll over all of them (this runs
        every few milliseconds during rounds; asking each socket cost a call per worker)."""
        self.last_poll = time.perf_counter()
        alive = self.alive()
        key = tuple(link.sock for link in alive)
        if self._poller is None or self._poller[0] != key:  # membership or sockets changed
            poller = zmq.Poller()
            for link in alive:
                poller.register(link.sock, zmq.POLLIN)
            self._poller = (key, poller, {link.sock: link for link in alive})
        _, poller, link_of = self._poller
        for sock, _ in poller.poll(0):
            self.drain(link_of[sock])

    def _on_message(self, link: WorkerLink, msg: Message) -> None:
        match msg:
            case Heartbeat(stats=stats):
                if link.profile is not None:
                    before = link.heartbeat
                    link.profile.observe_compute(
                        float(stats.get("mlp_neurons", 0)) - float(before.get("mlp_neurons", 0)),
                        float(stats.get("mlp_ms", 0.0)) - float(before.get("mlp_ms", 0.0)))
                link.heartbeat = stats
            case Need(request=request, layer=layer, positions=positions):
                self.events.append(RepairNeeded(link, request, layer, positions))
            case _:
                pass  # pong, a late ready: liveness only

    # -- liveness ------------------------------------------------------------------------
    def check(self) -> list[Event]:
        """Poll every link; report silent workers as dead, try lost ones again; return (and
        forget) every event since the last check."""
        self.poll()
        now = time.monotonic()
        for link in self.links:
            if link.alive and now - link.last_seen > self.opts.dead_after_s:
                self.events.append(self.lost(link, "no heartbeat"))
            elif not link.alive and now - link.last_attempt > self.opts.rejoin_every_s:
                self._try_rejoin(link)
        events, self.events = self.events, []
        return events

    def lost(self, link: WorkerLink, reason: str) -> Dead:
        """Mark a worker dead (not tried again before rejoin_every_s); its event."""
        link.alive = False
        link.last_attempt = time.monotonic()
        return Dead(link, reason)

    def _try_rejoin(self, link: WorkerLink) -> None:
        link.last_attempt = time.monotonic()
        try:
            joined = self._join(link, 0.2)
        except HaloError as exc:
            self.log(str(exc))
            joined = False
        if not joined:
            link.alive = False
            return
        self.events.append(Rejoined(link))

    def ping_all(self, msg_for: Callable[[], Message]) -> None:
        for link in self.alive():
            self.send(link, msg_for())

    def close(self, bye: Message) -> None:
        for link in self.links:
            if link.sock is None:
                continue
            linger = 0
            if link.alive and link.channels is not None:
                try:
                    self.send(link, bye, zmq.NOBLOCK)
                    linger = 200
                except zmq.ZMQError:
                    pass
            self._close(link, linger)

    @staticmethod
    def _close(link: WorkerLink, linger: int) -> None:
        if link.watch is not None:
            link.watch.close()
            link.watch = None
        link.sock.close(linger)
        link.sock = None
