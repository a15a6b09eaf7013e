"""`halo worker`: computes the partial residual updates of the groups it is assigned.

One process, one thread, one event loop over two sockets bound to the same port number: a ZeroMQ
ROUTER (TCP: the control plane, and the data plane in strict mode) and a UDP socket (the data plane
in relaxed mode). A worker serves one coordinator session at a time; a new coordinator's join
replaces the old session, so a worker never needs a restart.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zmq

from halollm.errors import HaloError
from halollm.model.llama import Rope, project
from halollm.model.loader import content_hash, open_source
from halollm.paths import write_json_quietly
from halollm.runtime import protocol
from halollm.runtime.channel import Channel
from halollm.runtime.device_bench import DeviceBenchmarks
from halollm.runtime.handshake import Challenges, LinkChannels
from halollm.runtime.keys import ClusterKey
from halollm.runtime.liveness import ConnectionWatch
from halollm.runtime.messages import (
    PROTOCOL_VERSION,
    WRONG_KEY,
    Bye,
    Heartbeat,
    Hello,
    Join,
    Kv,
    Message,
    Need,
    Ping,
    Plan,
    Pong,
    Ready,
    Refused,
    Welcome,
    blob_tensor,
    bound_router,
    decode,
    encode,
    encode_clear,
    is_sealed,
)
from halollm.runtime.protocol import ACTIVATION, ATTN, HEAD, PARTIAL, ProtocolError, RoundTag
from halollm.runtime.tensor_codec import decode_body, encode_body, wire_for_dtype
from halollm.runtime.transport import UdpEndpoint
from halollm.runtime.worker_session import Session, apply_plan, public_stats
from halollm.scheduler import profile

HEARTBEAT_S, BUSY_HEARTBEAT_S = 0.25, 1.0  # busy: rounds flow, their partials prove liveness
BIND_ATTEMPTS = 20  # free ports tried for `--listen HOST:0` (UDP's, unless TCP's is taken)


class Worker:
    def __init__(self, host: str, port: int, key: ClusterKey, model: str | None,
                 log: Callable[[str], None] | None = None, idle_timeout: float = 900.0,
                 drop_rate: float = 0.0, memory_budget: int | None = None,
                 status_file: Path | None = None, spin_s: float = 0.0) -> None:
        self.log = log or (lambda msg: print(f"[worker] {msg}", file=sys.stderr, flush=True))
        self.challenges = Challenges(key)  # stretches the key under this worker's salt
        self.source = open_source(model)
        self.config = self.source.config
        self.model_hash = content_hash(Path(self.source.path))
        self.rope = Rope(self.config)
        self.idle_timeout = idle_timeout
        self.ctx = zmq.Context.instance()
        self.udp, self.router = self._bind(host, port, drop_rate)
        self.port = self.udp.port
        self.watch = ConnectionWatch(self.router)
        self.session: Session | None = None
        self.stats: dict[str, Any] = dict(rounds=0, probes=0, repair_requests=0, repaired=0,
                                          repair_ms=[], compute_ms=0.0, mlp_neurons=0, mlp_ms=0.0)
        self.memory_bytes = profile.memory_budget(memory_budget)
        self.bench = DeviceBenchmarks(self.source, self.log)
        self.status_file = status_file
        self.spin_s = spin_s  # poll this long for the next activation before sleeping
        self._need_sent: dict[tuple[int, int], float] = {}
        self._stop = False
        self._recheck = True  # read ZeroMQ's events on the next turn (see serve)

    def _bind(self, host: str, port: int, drop_rate: float) -> tuple[UdpEndpoint, Any]:
        """The UDP endpoint and the ZeroMQ ROUTER on the same port number. Port 0: the one
        the kernel gives the UDP socket, tried again (up to BIND_ATTEMPTS) while its TCP
        twin is in use -- ephemeral ports are shared with outgoing TCP connections."""
        for attempt in range(1, BIND_ATTEMPTS + 1):
            udp = UdpEndpoint(host, port, self._data_channel, drop_rate=drop_rate)
            try:
                return udp, bound_router(self.ctx, host, udp.port)
            except HaloError:
                udp.close()
                if port != 0 or attempt == BIND_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    # -- the loop ------------------------------------------------------------------------
    @torch.inference_mode()
    def serve(self) -> None:
        # select() on the UDP socket and ZeroMQ's notification fds: cheaper per wake-up than
        # zmq.Poller. ZeroMQ's fds are edge-triggered: its sockets' events are read (and
        # drained) after one of them fired, after anything was sent on the router (a send
        # can take an edge), after an idle wait, and every turn while spinning -- not on
        # every datagram's turn (~40 us a round on a busy device).
        zmq_fd = self.router.getsockopt(zmq.FD)
        udp = self.udp.sock
        last_beat = 0.0
        while not self._stop:
            if self._recheck or self.spin_s:
                self._recheck = False
                self._watch_connections()
                if self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._drain_router()
            ready = [udp] if self.spin_s and self.udp.readable(self.spin_s, self.spin_s) else \
                select.select([udp, zmq_fd, self.watch.fd], [], [], HEARTBEAT_S)[0]
            if not ready or zmq_fd in ready or self.watch.fd in ready:
                self._recheck = True
            if udp in ready:
                for msg in self.udp.receive():
                    self._guarded_data(msg.kind, msg.wire, msg.tag, msg.body, True)
            now = time.monotonic()
            s = self.session
            busy = s is not None and now - s.last_heard < HEARTBEAT_S  # rounds flow
            if now - last_beat >= (BUSY_HEARTBEAT_S if busy else HEARTBEAT_S):
                if s is not None:
                    self._send(s, Heartbeat(s.session, self._public_stats()))
                self._write_status()
                last_beat = now
            if s is not None and now - s.last_heard > self.idle_timeout:
                self.log("coordinator silent for too long; waiting for a new one")
                self._end_session()

    def _watch_connections(self) -> None:
        s = self.session
        if self.watch.closed() & {s.fd if s is not None else None}:
            self.log("the coordinator's connection closed; waiting for a new one")
            self._end_session()

    def close(self) -> None:
        self.watch.close()
        self.router.close(0)
        self.udp.close()
        self.source.close()

    def _drain_router(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            identity, rest = frames[0].bytes, [f.bytes for f in frames[1:]]
            if len(rest) == 1 and rest[0][:2] == protocol.MAGIC:  # strict-mode data
                self._on_datagram(rest[0], identity)
                continue
            try:
                self._on_frames(identity, rest, frames[1])
            except Exception as exc:  # noqa: BLE001 -- a worker never dies of a message
                self.udp.counters["handler_errors"] += 1
                self.log(f"could not handle a control message: {exc}")

    def _on_frames(self, identity: bytes, rest: list[bytes], first: zmq.Frame) -> None:
        s = self.session
        ours = s is not None and identity == s.identity
        channel = s.link.control if s is not None and ours else \
            self.challenges.channel(identity) if is_sealed(rest) else None
        try:
            msg = decode(rest, channel)
        except ProtocolError as exc:
            self.udp.counters[exc.reason] += 1
            if exc.reason == "unauthenticated" and not ours and channel is not None:
                self.challenges.take(identity)  # a Join sealed with another key
                self._send_clear(identity, Refused(WRONG_KEY))
                self.log(f"refused a coordinator: {WRONG_KEY}")
            return
        if isinstance(msg, Hello):
            self._on_hello(identity, msg)
        elif isinstance(msg, Join) and not ours:
            self._on_join(identity, msg, first)
        elif not ours or getattr(msg, "session", None) != s.session:  # type: ignore[union-attr]
            self.udp.counters["stale_control"] += 1
        else:
            self._on_control(s, msg)  # type: ignore[arg-type]

    # -- control plane -------------------------------------------------------------------
    def _send(self, s: Session, msg: Message) -> None:
        self._send_frames([s.identity, *encode(s.link.control, msg)])

    def _send_clear(self, identity: bytes, msg: Message) -> None:
        self._send_frames([identity, *encode_clear(msg)])

    def _send_frames(self, frames: list[bytes]) -> None:
        self.router.send_multipart(frames)
        self._recheck = True  # the send may have taken the edge of ZeroMQ's fd

    def _data_channel(self, sender: int, session: int) -> Channel | None:
        s = self.session
        if s is None or sender != 0 or session != s.session:
            return None
        return s.link.data

    def _on_control(self, s: Session, msg: Message) -> None:
        s.last_heard = time.monotonic()
        match msg:
            case Plan():
                self._on_plan(s, msg)
            case Kv():
                self._on_kv(s, msg)
            case Ping(t=t):
                self._send(s, Pong(s.session, t))
            case Bye():
                self.log("session ended by the coordinator")
                self._end_session()
            case _:
                self.udp.counters["unexpected_control"] += 1

    def _end_session(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = None

    def _on_hello(self, identity: bytes, h: Hello) -> None:
        """A coordinator opens a join: a fresh challenge (nothing changes before its Join)."""
        if h.version != PROTOCOL_VERSION:
            self._send_clear(identity, Refused(f"protocol version {h.version} (this worker "
                                               f"speaks {PROTOCOL_VERSION})"))
            self.log(f"refused a coordinator speaking protocol version {h.version}")
            return
        self._send_clear(identity, self.challenges.issue(identity, h))

    def _on_join(self, identity: bytes, j: Join, first: zmq.Frame) -> None:
        opened = self.challenges.take(identity)
        if opened is None or opened[0] != j.session:
            self.udp.counters["stale_control"] += 1
            return
        session, link = opened
        if j.model_hash != self.model_hash:
            self._refuse(identity, link, session, f"different model (worker has "
                         f"{self.model_hash[:12]}…, coordinator has {j.model_hash[:12]}…)")
            return
        try:
            speed = self.bench.speed(j.weight_format)
        except HaloError as exc:
            self._refuse(identity, link, session, str(exc))
            return
        udp_host, udp_port = j.udp
        self._watch_connections()  # a closed connection's number may be this one's now
        self._end_session()
        self.session = Session(session=session, identity=identity, link=link,
                               udp_addr=(str(udp_host), int(udp_port)),
                               fd=self.watch.fd_of(first), device=int(j.device))
        self._need_sent.clear()
        self._send(self.session, Welcome(
            session, self.model_hash, os.cpu_count(), torch.get_num_threads(), speed,
            self.memory_bytes, self.bench.load_speed))
        self.log(f"joined session {session:08x}")

    def _refuse(self, identity: bytes, link: LinkChannels, session: int, reason: str) -> None:
        self._send_frames([identity, *encode(link.control, Refused(reason, session))])
        self.log(f"refused a coordinator: {reason}")

    def _on_plan(self, s: Session, p: Plan) -> None:
        t0 = time.perf_counter()
        try:
            error = apply_plan(s, p, self.source, self.rope, self.memory_bytes, self.log)
        except HaloError as exc:
            self._send(s, Ready(s.session, p.epoch, error=str(exc)))
            raise
        self._send(s, Ready(s.session, p.epoch, error=error) if error else
                   Ready(s.session, s.epoch, build_ms=round(1e3 * (time.perf_counter() - t0), 1)))

    def _on_kv(self, s: Session, m: Kv) -> None:
        """Keys/values for positions we missed (repair) or never had (replay)."""
        if not s.fill_kv(m, blob_tensor(m.x, (m.n, self.config.hidden_size))) or m.replay:
            return
        self.stats["repaired"] += m.n
        for p in range(m.start, m.start + m.n):
            sent = self._need_sent.pop((m.layer, p), None)
            if sent is not None:
                self.stats["repair_ms"].append(1e3 * (time.monotonic() - sent))

    def _public_stats(self) -> dict[str, Any]:
        return public_stats(self.stats, self.session, self.udp.counters)

    def _write_status(self) -> None:
        """What `halo testbed status` shows of this worker: its profile and counters."""
        if self.status_file is not None:
            write_json_quietly(self.status_file, {
                "speed_neurons_per_ms": self.bench.last,
                "memory_bytes": self.memory_bytes, "session": None if self.session is None
                else f"{self.session.session:08x}", **self._public_stats()})

    # -- data plane ----------------------------------------------------------------------
    def _on_datagram(self, data: bytes, identity: bytes) -> None:
        try:
            frag = protocol.decode(data, self._data_channel)
        except ProtocolError as exc:
            self.udp.counters[exc.reason] += 1
            return
        if frag.count != 1:
            self.udp.counters["malformed"] += 1
            return
        s = self.session
        if s is not None and identity == s.identity:
            self._guarded_data(frag.kind, frag.wire, frag.tag, frag.payload, False)

    def _guarded_data(self, kind: int, wire: int, tag: RoundTag, body: bytes, via_udp: bool
                      ) -> None:
        try:
            self._on_data(kind, wire, tag, body, via_udp)
        except Exception as exc:  # noqa: BLE001 -- a worker never dies of a message
            self.udp.counters["handler_errors"] += 1
            self.log(f"could not compute round {tag}: {exc}")

    def _on_data(self, kind: int, wire: int, tag: RoundTag, body: bytes, via_udp: bool) -> None:
        s = self.session
        probe = tag.phase == protocol.PROBE  # before any plan: no epoch, no layers
        if s is None or kind != ACTIVATION or tag.session != s.session or \
                (tag.epoch != s.epoch and not probe):
            self.udp.counters["stale"] += 1
            return
        if tag.layer >= len(s.layers) and not probe:
            self.udp.counters["malformed"] += 1
            return
        s.last_heard = time.monotonic()
        try:
            _, x = decode_body(body, wire, tag.ntok, self.config.hidden_size)
        except ProtocolError as exc:
            self.udp.counters[exc.reason] += 1
            return
        if probe:
            self.stats["probes"] += 1
            self._reply(s, tag, wire, encode_body(torch.zeros_like(x), wire), via_udp)
            return
        if tag.request != s.request:
            s.start_request(tag.request)
        out = self._compute(s, tag, x)
        if out is None:
            return
        groups, y = out
        self.stats["rounds"] += 1
        wire = wire_for_dtype(s.dtype) if tag.phase == HEAD else s.wire  # logits: lossless
        self._reply(s, tag, wire, encode_body(y, wire, groups), via_udp)

    def _reply(self, s: Session, tag: RoundTag, wire: int, body: bytes, via_udp: bool) -> None:
        if via_udp:
            self.udp.send(PARTIAL, s.device, wire, tag, body, [(s.udp_addr, s.link.data)])
        else:
            data = protocol.encode(PARTIAL, s.device, wire, tag, body, s.link.data,
                                   mtu=1 << 30)[0]
            self._send_frames([s.identity, data])

    def _compute(self, s: Session, tag: RoundTag, x: torch.Tensor
                 ) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """(groups, partial update) of this device's share of the round, or None."""
        work = s.layers[tag.layer]
        t0 = time.perf_counter()
        if tag.phase == HEAD:
            return None if s.head is None else ((), project(x, s.head))
        if tag.phase == ATTN:
            if work.attn is None:
                return None
            mask = self._key_mask(s, tag)
            y = s.attention(tag.layer).forward(x, tag.pos, key_mask=mask)
            s.mark_known(tag.layer, tag.pos, tag.ntok)
            groups = work.attn_groups
        else:
            mlp = s.mlp(tag.layer)
            if mlp is None:
                return None
            y = mlp.forward(x)
            self.stats["mlp_neurons"] += mlp.n * tag.ntok
            self.stats["mlp_ms"] += 1e3 * (time.perf_counter() - t0)
            groups = work.mlp_groups
        self.stats["compute_ms"] += 1e3 * (time.perf_counter() - t0)
        return groups, y

    def _key_mask(self, s: Session, tag: RoundTag) -> torch.Tensor | None:
        """Session.key_mask, asking the coordinator for the positions not asked yet."""
        mask, new = s.key_mask(tag.layer, tag.pos, tag.ntok)
        if new:
            now = time.monotonic()
            self._need_sent.update({(tag.layer, p): now for p in new})
            self.stats["repair_requests"] += 1
            self._send(s, Need(s.session, s.request, tag.layer, new))
        return mask
