"""`halo worker`: computes the partial residual updates of the groups it is assigned.

One process, one thread, one event loop over two sockets bound to the same port number:
a ZeroMQ ROUTER (TCP: the control plane, and the data plane in strict mode) and a UDP socket
(the data plane in relaxed mode). A worker serves one coordinator session at a time; a new
coordinator's join replaces the old session, so a worker never needs a restart.
"""

from __future__ import annotations

import errno
import json
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
from halollm.loader.store import GroupStore
from halollm.model.llama import Rope, cached
from halollm.model.loader import DTYPES, content_hash, open_source
from halollm.runtime import protocol
from halollm.runtime.device_bench import compute_benchmark, load_benchmark
from halollm.runtime.messages import (
    PROTOCOL_VERSION,
    Bye,
    Heartbeat,
    Hello,
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
    decode,
    encode,
    harden,
    join_proof,
    keyless_refusal,
)
from halollm.runtime.protocol import ACTIVATION, ATTN, PARTIAL, ProtocolError, RoundTag
from halollm.runtime.tensor_codec import decode_body, encode_body
from halollm.runtime.transport import UdpEndpoint
from halollm.runtime.worker_session import (
    Session,
    build_layers,
    group_reader,
    parse_layers,
    plan_sizes,
)
from halollm.scheduler import profile

HEARTBEAT_S = 0.25


class Worker:
    def __init__(self, host: str, port: int, key: bytes, model: str | None,
                 log: Callable[[str], None] | None = None, idle_timeout: float = 900.0,
                 drop_rate: float = 0.0, memory_budget: int | None = None,
                 status_file: Path | None = None) -> None:
        self.log = log or (lambda msg: print(f"[worker] {msg}", file=sys.stderr, flush=True))
        self.key = key
        self.source = open_source(model)
        self.config = self.source.config
        self.model_hash = content_hash(Path(self.source.path))
        self.rope = Rope(self.config)
        self.idle_timeout = idle_timeout
        self.udp = UdpEndpoint(host, port, key, drop_rate=drop_rate)
        self.port = self.udp.port
        self.ctx = zmq.Context.instance()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        harden(self.router)
        try:
            self.router.bind(f"tcp://{host}:{self.port}")
        except zmq.ZMQError as exc:
            self.udp.close()
            if exc.errno == errno.EADDRINUSE:
                raise HaloError(f"TCP port {self.port} on {host} is in use; choose another "
                                "port") from exc
            raise HaloError(f"cannot listen on TCP {host}:{self.port}: {exc}") from exc
        self.session: Session | None = None
        self.stats: dict[str, Any] = {"rounds": 0, "repair_requests": 0, "repaired": 0,
                                      "repair_ms": [], "compute_ms": 0.0, "mlp_neurons": 0,
                                      "mlp_ms": 0.0}
        self.memory_bytes = profile.memory_budget(memory_budget)
        self.speed: float | None = None  # neurons per ms, benchmarked at the first join
        self.load_speed = 0.0  # neurons per ms read from the model file, likewise
        self.status_file = status_file
        self._need_sent: dict[tuple[int, int], float] = {}
        self._stop = False

    # -- the loop ------------------------------------------------------------------------
    @torch.inference_mode()
    def serve(self) -> None:
        # select() on the UDP socket and ZeroMQ's notification fd: cheaper per wake-up than
        # zmq.Poller. ZeroMQ's fd is edge-triggered, so its EVENTS are checked every turn.
        zmq_fd = self.router.getsockopt(zmq.FD)
        udp = self.udp.sock
        last_beat = 0.0
        while not self._stop:
            if self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._drain_router()
            ready, _, _ = select.select([udp, zmq_fd], [], [], HEARTBEAT_S)
            if udp in ready:
                for msg in self.udp.receive():
                    self._guarded_data(msg.kind, msg.wire, msg.tag, msg.body, True)
            now = time.monotonic()
            s = self.session
            if now - last_beat >= HEARTBEAT_S:
                if s is not None:
                    self._send(s, self._heartbeat(s))
                self._write_status()
                last_beat = now
            if s is not None and now - s.last_heard > self.idle_timeout:
                self.log("coordinator silent for too long; waiting for a new one")
                self._end_session()

    def close(self) -> None:
        self.router.close(0)
        self.udp.close()
        self.source.close()

    def _drain_router(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            identity, rest = frames[0], frames[1:]
            if len(rest) == 1 and rest[0][:2] == protocol.MAGIC:  # strict-mode data
                self._on_datagram(rest[0], identity)
                continue
            try:
                msg = decode(self.key, rest)
            except ProtocolError as exc:
                self.udp.counters[exc.reason] += 1
                if exc.reason == "unauthenticated":
                    self.router.send_multipart([identity, *keyless_refusal("wrong cluster key")])
                continue
            try:
                self._on_control(identity, msg)
            except Exception as exc:  # noqa: BLE001 -- a worker never dies of a message
                self.udp.counters["handler_errors"] += 1
                self.log(f"could not handle a {msg.kind!r} message: {exc}")

    # -- control plane -------------------------------------------------------------------
    def _send(self, s: Session, msg: Message) -> None:
        self.router.send_multipart([s.identity, *encode(self.key, msg)])

    def _on_control(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, Hello):
            self._on_hello(identity, msg)
            return
        s = self.session
        if s is None or getattr(msg, "session", None) != s.session or identity != s.identity:
            self.udp.counters["stale_control"] += 1
            return
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
        def refuse(reason: str) -> None:
            self.router.send_multipart([identity, *encode(self.key, Refused(reason))])
            self.log(f"refused a coordinator: {reason}")

        if h.version != PROTOCOL_VERSION:
            return refuse(f"protocol version {h.version} (this worker speaks "
                          f"{PROTOCOL_VERSION})")
        if h.proof != join_proof(self.key, "coordinator", h.nonce, h.model_hash):
            return refuse("wrong cluster key")
        if h.model_hash != self.model_hash:
            return refuse(f"different model (worker has {self.model_hash[:12]}…, coordinator "
                          f"has {h.model_hash[:12]}…)")
        udp_host, udp_port = h.udp
        self._end_session()
        self.session = Session(session=h.session, identity=identity,
                               udp_addr=(str(udp_host), int(udp_port)))
        self._need_sent.clear()
        if self.speed is None:
            self.speed = compute_benchmark(self.config, cached(self.source.tensor))
            self.load_speed = load_benchmark(self.config, self.source)
            self.log(f"compute benchmark: {self.speed:.0f} MLP neurons/ms; loading "
                     f"{self.load_speed:.0f} neurons/ms")
        self._send(self.session, Welcome(
            h.session, join_proof(self.key, "worker", h.nonce, self.model_hash),
            self.model_hash, os.cpu_count(), torch.get_num_threads(), self.speed,
            self.memory_bytes, self.load_speed))
        self.log(f"joined session {h.session:08x}")

    def _on_plan(self, s: Session, p: Plan) -> None:
        t0 = time.perf_counter()
        if p.dtype not in DTYPES:
            raise HaloError(f"unknown dtype {p.dtype!r}")
        dtype = DTYPES[p.dtype]
        try:
            layers = parse_layers(p.layers, self.config)
        except HaloError as exc:
            self._send(s, Ready(s.session, p.epoch, error=str(exc)))
            raise
        sizes = plan_sizes(self.config, layers, dtype)
        stream = sum(sizes.values()) > self.memory_bytes
        if stream and max(sizes.values()) > self.memory_bytes:
            self._send(s, Ready(s.session, p.epoch, error=(
                f"its memory budget ({self.memory_bytes / 2**20:.1f} MiB) cannot hold one "
                f"layer's share of the plan ({max(sizes.values()) / 2**20:.1f} MiB)")))
            return
        s.close()
        s.layers = build_layers(self.source, self.rope, s, layers, dtype, stream)
        if stream:
            s.store = GroupStore(list(sizes), sizes, group_reader(self.source, layers, dtype),
                                 self.memory_bytes)
            self.log(f"plan of {sum(sizes.values()) / 2**20:.0f} MiB exceeds the memory budget "
                     f"({self.memory_bytes / 2**20:.0f} MiB): streaming its weights")
        s.dtype, s.device, s.epoch, s.wire = dtype, p.device, p.epoch, p.wire
        if p.request != s.request:
            s.start_request(p.request)
        self._send(s, Ready(s.session, s.epoch,
                            build_ms=round(1e3 * (time.perf_counter() - t0), 1)))

    def _on_kv(self, s: Session, m: Kv) -> None:
        """Keys/values for positions we missed (repair) or never had (replay)."""
        if m.request != s.request:
            if not m.replay:
                return
            s.start_request(m.request)
        if not 0 <= m.layer < len(s.layers) or s.layers[m.layer].attn is None or m.start < 0:
            return
        x = blob_tensor(m.x, (m.n, self.config.hidden_size))
        with torch.inference_mode():
            s.attention(m.layer).fill_cache(x.to(s.dtype), m.start)
        s.mark_known(m.layer, m.start, m.n)
        if not m.replay:
            self.stats["repaired"] += m.n
            for p in range(m.start, m.start + m.n):
                sent = self._need_sent.pop((m.layer, p), None)
                if sent is not None:
                    self.stats["repair_ms"].append(1e3 * (time.monotonic() - sent))

    def _heartbeat(self, s: Session) -> Message:
        return Heartbeat(s.session, self._public_stats())

    def _public_stats(self) -> dict[str, Any]:
        ms = self.stats["repair_ms"]
        s = self.session
        loader = None
        if s is not None and s.store is not None:
            loader = {k: v for k, v in s.store.stats.to_json().items() if k != "per_token"}
        return {"rounds": self.stats["rounds"], "repair_requests": self.stats["repair_requests"],
                "loader": loader,
                "repaired_positions": self.stats["repaired"],
                "repair_mean_ms": round(sum(ms) / len(ms), 3) if ms else None,
                "compute_ms": round(self.stats["compute_ms"], 1),
                "mlp_neurons": self.stats["mlp_neurons"], "mlp_ms": round(self.stats["mlp_ms"], 3),
                "datagrams": dict(self.udp.counters)}

    def _write_status(self) -> None:
        """What `halo testbed status` shows of this worker: its profile and counters."""
        if self.status_file is None:
            return
        st = {"speed_neurons_per_ms": None if self.speed is None else round(self.speed, 1),
              "memory_bytes": self.memory_bytes, "session": None if self.session is None
              else f"{self.session.session:08x}", **self._public_stats()}
        tmp = self.status_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(st))
            tmp.replace(self.status_file)
        except OSError:
            pass  # a full or read-only disk must not stop the worker

    # -- data plane ----------------------------------------------------------------------
    def _on_datagram(self, data: bytes, identity: bytes) -> None:
        try:
            frag = protocol.decode(data, self.key)
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
        if s is None or kind != ACTIVATION or tag.session != s.session or tag.epoch != s.epoch:
            self.udp.counters["stale"] += 1
            return
        if tag.layer >= len(s.layers):
            self.udp.counters["malformed"] += 1
            return
        s.last_heard = time.monotonic()
        try:
            _, x = decode_body(body, wire, tag.ntok, self.config.hidden_size)
        except ProtocolError as exc:
            self.udp.counters[exc.reason] += 1
            return
        if tag.request != s.request:
            s.start_request(tag.request)
        out = self._compute(s, tag, x)
        if out is None:
            return
        groups, y = out
        reply = encode_body(y, s.wire, groups)
        self.stats["rounds"] += 1
        if via_udp:
            self.udp.send(PARTIAL, s.device, s.wire, tag, reply, [s.udp_addr])
        else:
            data = protocol.encode(PARTIAL, s.device, s.wire, tag, reply, self.key,
                                   mtu=1 << 30)[0]
            self.router.send_multipart([s.identity, data])

    def _compute(self, s: Session, tag: RoundTag, x: torch.Tensor
                 ) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """(groups, partial update) of this device's share of the round, or None."""
        work = s.layers[tag.layer]
        t0 = time.perf_counter()
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
        """None when every earlier position is in the cache; otherwise a mask that hides the
        missing ones, after asking the coordinator for them (KV repair)."""
        if tag.pos == 0:
            return None
        known = s.known_upto(tag.layer, tag.pos + tag.ntok)
        if bool(known[: tag.pos].all()):
            return None
        missing = (~known[: tag.pos]).nonzero().flatten().tolist()
        asked = s.asked.setdefault(tag.layer, set())
        new = [p for p in missing if p not in asked]
        if new:
            asked.update(new)
            now = time.monotonic()
            for p in new:
                self._need_sent[(tag.layer, p)] = now
            self.stats["repair_requests"] += 1
            self._send(s, Need(s.session, s.request, tag.layer, new))
        mask = known.clone()
        mask[tag.pos: tag.pos + tag.ntok] = True
        return mask
