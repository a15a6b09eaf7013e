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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from halollm.errors import HaloError
from halollm.groups import GroupId
from halollm.loader.store import GroupStore
from halollm.loader.weights import (
    GroupWeights,
    attention_shard,
    group_nbytes,
    mlp_shard,
    read_group,
)
from halollm.model.llama import AttentionShard, MlpShard, Rope, cached
from halollm.model.loader import DTYPES, content_hash, open_source
from halollm.runtime import control, profile, protocol
from halollm.runtime.protocol import ACTIVATION, ATTN, PARTIAL, ProtocolError, RoundTag
from halollm.runtime.tensor_codec import decode_body, encode_body
from halollm.runtime.transport import UdpEndpoint

HEARTBEAT_S = 0.25


@dataclass
class LayerWork:
    attn_groups: tuple[int, ...] = ()
    mlp_groups: tuple[int, ...] = ()
    attn: AttentionShard | None = None
    mlp: MlpShard | None = None
    mlp_units: tuple[int, ...] = ()  # streamed: the MLP neurons, weights in the store


@dataclass
class Session:
    session: int
    identity: bytes  # the coordinator's ZeroMQ identity on our ROUTER
    udp_addr: tuple[str, int]
    device: int = -1
    epoch: int = -1
    wire: int = 1
    dtype: torch.dtype = torch.float16
    layers: list[LayerWork] = field(default_factory=list)
    store: GroupStore | None = None  # the plan exceeds the memory budget: weights streamed
    request: int = -1
    known: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> filled positions
    asked: dict[int, set[int]] = field(default_factory=dict)  # layer -> positions requested
    last_heard: float = field(default_factory=time.monotonic)

    def start_request(self, request: int) -> None:
        """A new request: no cached position is known any more."""
        self.request, self.known, self.asked = request, {}, {}


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
                    self._on_data(msg.kind, msg.wire, msg.tag, msg.body, via_udp=True)
            now = time.monotonic()
            s = self.session
            if now - last_beat >= HEARTBEAT_S:
                if s is not None:
                    self._send(s, "heartbeat", stats=self._public_stats())
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
                header, blobs = control.unpack(self.key, rest)
            except ProtocolError as exc:
                self.udp.counters[exc.reason] += 1
                if exc.reason == "unauthenticated":
                    self.router.send_multipart([identity, json.dumps(
                        {"kind": "refused", "reason": "wrong cluster key"}).encode(),
                        b"\0" * protocol.MAC_SIZE])
                continue
            try:
                self._on_control(identity, header, blobs)
            except (ProtocolError, KeyError, ValueError, TypeError) as exc:
                self.udp.counters["malformed"] += 1
                self.log(f"bad control message {header.get('kind')!r}: {exc}")

    # -- control plane -------------------------------------------------------------------
    def _send(self, s: Session, kind: str, blobs: list[bytes] | None = None, **fields: Any
              ) -> None:
        self.router.send_multipart([s.identity, *control.pack(self.key, kind, blobs,
                                                               session=s.session, **fields)])

    def _on_control(self, identity: bytes, h: dict[str, Any], blobs: list[bytes]) -> None:
        kind = h["kind"]
        if kind == "hello":
            self._on_hello(identity, h)
            return
        s = self.session
        if s is None or h.get("session") != s.session or identity != s.identity:
            self.udp.counters["stale_control"] += 1
            return
        s.last_heard = time.monotonic()
        if kind == "plan":
            self._on_plan(s, h)
        elif kind == "kv":
            self._on_kv(s, h, blobs)
        elif kind == "ping":
            self._send(s, "pong", t=h.get("t"))
        elif kind == "bye":
            self.log("session ended by the coordinator")
            self._end_session()

    def _end_session(self) -> None:
        if self.session is not None and self.session.store is not None:
            self.session.store.close()
        self.session = None

    def _on_hello(self, identity: bytes, h: dict[str, Any]) -> None:
        def refuse(reason: str) -> None:
            self.router.send_multipart([identity, *control.pack(self.key, "refused",
                                                                 reason=reason)])
            self.log(f"refused a coordinator: {reason}")

        if h.get("version") != control.PROTOCOL_VERSION:
            return refuse(f"protocol version {h.get('version')} (this worker speaks "
                          f"{control.PROTOCOL_VERSION})")
        nonce = str(h.get("nonce", ""))
        if h.get("proof") != control.join_proof(self.key, "coordinator", nonce,
                                                  str(h.get("model_hash"))):
            return refuse("wrong cluster key")
        if h.get("model_hash") != self.model_hash:
            return refuse(f"different model (worker has {self.model_hash[:12]}…, coordinator "
                          f"has {str(h.get('model_hash'))[:12]}…)")
        udp_host, udp_port = h["udp"]
        self._end_session()
        self.session = Session(session=int(h["session"]), identity=identity,
                               udp_addr=(str(udp_host), int(udp_port)))
        self._need_sent.clear()
        if self.speed is None:
            self.speed = profile.compute_benchmark(self.config, cached(self.source.tensor))
            self.load_speed = profile.load_benchmark(self.config, self.source)
            self.log(f"compute benchmark: {self.speed:.0f} MLP neurons/ms; loading "
                     f"{self.load_speed:.0f} neurons/ms")
        self._send(self.session, "welcome", proof=control.join_proof(
            self.key, "worker", nonce, self.model_hash), model_hash=self.model_hash,
            cores=os.cpu_count(), threads=torch.get_num_threads(), speed=self.speed,
            memory=self.memory_bytes, load_speed=self.load_speed)
        self.log(f"joined session {self.session.session:08x}")

    def _on_plan(self, s: Session, h: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        dtype = DTYPES[h["dtype"]]
        layers = json.loads(h["layers"])
        units = [(tuple(spec["attn"]["units"]), tuple(spec["mlp"]["units"])) for spec in layers]
        sizes = self._plan_sizes(units, dtype)
        stream = sum(sizes.values()) > self.memory_bytes
        if stream and max(sizes.values()) > self.memory_bytes:
            self._send(s, "ready", epoch=int(h["epoch"]), error=(
                f"its memory budget ({self.memory_bytes / 2**20:.1f} MiB) cannot hold one "
                f"layer's share of the plan ({max(sizes.values()) / 2**20:.1f} MiB)"))
            return
        if s.store is not None:
            s.store.close()
            s.store = None
        keep = s.dtype == dtype and len(s.layers) == len(layers)
        new_layers = []
        for i, spec in enumerate(layers):
            old = s.layers[i] if keep else LayerWork()
            work = LayerWork(tuple(spec["attn"]["groups"]), tuple(spec["mlp"]["groups"]))
            attn_units, mlp_units = units[i]
            if attn_units:
                same = old.attn is not None and old.attn.kv_heads == attn_units and \
                    (old.attn.w_qkv is None) == stream
                if same:
                    work.attn = old.attn
                elif stream:
                    work.attn = AttentionShard.without_weights(self.config, attn_units,
                                                               self.rope)
                else:
                    work.attn = attention_shard(self.source, self.config, i, attn_units, dtype,
                                                self.rope)
                if not same:
                    s.known.pop(i, None)
            if mlp_units and stream:
                work.mlp_units = mlp_units
            elif mlp_units:
                same = old.mlp is not None and old.mlp.neurons == mlp_units
                work.mlp = old.mlp if same else mlp_shard(self.source, i, mlp_units, dtype)
            new_layers.append(work)
        if stream:
            s.store = GroupStore(list(sizes), sizes, lambda g: self._read(g, units, dtype),
                                 self.memory_bytes)
            self.log(f"plan of {sum(sizes.values()) / 2**20:.0f} MiB exceeds the memory budget "
                     f"({self.memory_bytes / 2**20:.0f} MiB): streaming its weights")
        s.layers, s.dtype = new_layers, dtype
        s.device, s.epoch, s.wire = int(h["device"]), int(h["epoch"]), int(h["wire"])
        if h.get("request") is not None and h["request"] != s.request:
            s.start_request(int(h["request"]))
        self._send(s, "ready", epoch=s.epoch, build_ms=round(1e3 * (time.perf_counter() - t0),
                                                             1))

    def _plan_sizes(self, units: list[tuple[tuple[int, ...], tuple[int, ...]]],
                    dtype: torch.dtype) -> dict[GroupId, int]:
        """Dequantized bytes of this device's share of every layer half (a store key)."""
        out: dict[GroupId, int] = {}
        for i, (attn, mlp) in enumerate(units):
            for kind, share in (("attn", attn), ("mlp", mlp)):
                if share:
                    out[GroupId(i, kind, 0)] = group_nbytes(self.config, kind, len(share),
                                                            dtype)
        return out

    def _read(self, gid: GroupId, units: list[tuple[tuple[int, ...], tuple[int, ...]]],
              dtype: torch.dtype) -> GroupWeights:
        attn, mlp = units[gid.layer]
        return read_group(self.source, self.config, gid.layer, gid.kind,
                          mlp if gid.kind == "mlp" else attn, dtype)

    def _attention(self, s: Session, layer: int, work: LayerWork) -> AttentionShard:
        """The layer's attention shard with its weights (from the store when streaming)."""
        assert work.attn is not None
        if s.store is not None:
            work.attn.w_qkv, work.attn.b_qkv, work.attn.w_o = s.store.get(
                GroupId(layer, "attn", 0)).tensors  # type: ignore[assignment]
        return work.attn

    def _release(self, s: Session, work: LayerWork) -> None:
        if s.store is not None and work.attn is not None:
            work.attn.w_qkv = work.attn.b_qkv = work.attn.w_o = None  # type: ignore[assignment]

    def _on_kv(self, s: Session, h: dict[str, Any], blobs: list[bytes]) -> None:
        """Keys/values for positions we missed (repair) or never had (replay)."""
        if h["request"] != s.request:
            if h.get("replay"):
                s.start_request(int(h["request"]))
            else:
                return
        layer, start = int(h["layer"]), int(h["start"])
        work = s.layers[layer] if layer < len(s.layers) else None
        if work is None or work.attn is None:
            return
        n = int(h["n"])
        x = control.blob_tensor(blobs[0], (n, self.config.hidden_size))
        with torch.inference_mode():
            self._attention(s, layer, work).fill_cache(x.to(s.dtype), start)
            self._release(s, work)
        self._mark_known(s, layer, start, n)
        if not h.get("replay"):
            self.stats["repaired"] += n
            for p in range(start, start + n):
                sent = self._need_sent.pop((layer, p), None)
                if sent is not None:
                    self.stats["repair_ms"].append(1e3 * (time.monotonic() - sent))

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
            self._on_data(frag.kind, frag.wire, frag.tag, frag.payload, via_udp=False)

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
        work = s.layers[tag.layer]
        t0 = time.perf_counter()
        if tag.phase == ATTN:
            if work.attn is None:
                return
            mask = self._key_mask(s, tag)
            out = self._attention(s, tag.layer, work).forward(x, tag.pos, key_mask=mask)
            self._release(s, work)
            self._mark_known(s, tag.layer, tag.pos, tag.ntok)
            groups = work.attn_groups
        else:
            mlp = work.mlp
            if mlp is None and work.mlp_units and s.store is not None:
                mlp = MlpShard.of(work.mlp_units,
                                  *s.store.get(GroupId(tag.layer, "mlp", 0)).tensors)
            if mlp is None:
                return
            out = mlp.forward(x)
            self.stats["mlp_neurons"] += mlp.n * tag.ntok
            self.stats["mlp_ms"] += 1e3 * (time.perf_counter() - t0)
            groups = work.mlp_groups
        reply = encode_body(out, s.wire, groups)
        self.stats["compute_ms"] += 1e3 * (time.perf_counter() - t0)
        self.stats["rounds"] += 1
        if via_udp:
            self.udp.send(PARTIAL, s.device, s.wire, tag, reply, [s.udp_addr])
        else:
            data = protocol.encode(PARTIAL, s.device, s.wire, tag, reply, self.key,
                                   mtu=1 << 30)[0]
            self.router.send_multipart([s.identity, data])

    def _known(self, s: Session, layer: int, upto: int) -> torch.Tensor:
        known = s.known.get(layer)
        if known is None or known.shape[0] < upto:
            grown = torch.zeros(max(upto, 256, 2 * (0 if known is None else known.shape[0])),
                                dtype=torch.bool)
            if known is not None:
                grown[: known.shape[0]] = known
            s.known[layer] = known = grown
        return known

    def _mark_known(self, s: Session, layer: int, start: int, n: int) -> None:
        self._known(s, layer, start + n)[start:start + n] = True

    def _key_mask(self, s: Session, tag: RoundTag) -> torch.Tensor | None:
        """None when every earlier position is in the cache; otherwise a mask that hides the
        missing ones, after asking the coordinator for them (KV repair)."""
        if tag.pos == 0:
            return None
        known = self._known(s, tag.layer, tag.pos + tag.ntok)
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
            self._send(s, "need", request=s.request, layer=tag.layer, positions=new)
        mask = known.clone()
        mask[tag.pos: tag.pos + tag.ntok] = True
        return mask
