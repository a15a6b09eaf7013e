"""The coordinator: device 0 of a cluster. It runs the model layer by layer, computes its own
(critical) groups, sends each layer input to the workers that hold other groups of that layer,
and sums what comes back: everything in strict mode, the critical groups plus whatever arrives
before the deadline in relaxed mode.
"""

from __future__ import annotations

import secrets
import select
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from halollm.errors import HaloError
from halollm.groups import GroupId, Partition
from halollm.loader.weights import attention_shard, group_nbytes, mlp_shard
from halollm.model.llama import MlpShard, Transformer, sum_partials
from halollm.model.loader import content_hash, dtype_name, open_source, open_tokenizer, parse_dtype
from halollm.predictor import store as predictor_store
from halollm.predictor.critical import SharePredictor, critical_devices
from halollm.runtime import control, protocol
from halollm.runtime.deadline import DeadlineEstimator
from halollm.runtime.placement import (
    COORDINATOR,
    Placement,
    PlanResult,
    equal_plan,
    solved_plan,
    static_plan,
)
from halollm.runtime.profile import (
    DeviceProfile,
    LinkEstimate,
    available_memory_bytes,
    compute_benchmark,
    memory_budget,
)
from halollm.runtime.protocol import ACTIVATION, ATTN, MLP, PARTIAL, ProtocolError, RoundTag
from halollm.runtime.significance import RANKING_TEXT, cached_ranking
from halollm.runtime.stats import SyncStats
from halollm.runtime.tensor_codec import WIRE_NAMES, decode_body, encode_body, wire_for_dtype
from halollm.runtime.transport import Address, UdpEndpoint, local_address_towards
from halollm.scheduler.solver import DeviceSpec

MODES = ("strict", "relaxed")
PLACEMENTS = ("static", "equal", "memory", "halo")
KIND_OF = {ATTN: "attn", MLP: "mlp"}
DWELL_CHECKS = 2  # a plan adopted for speed stays for at least this many re-planning checks
DEFAULT_RTT_MS = 0.5  # a LAN round trip with Python at both ends, until one is measured


@dataclass
class ClusterOptions:
    mode: str = "relaxed"
    wire: str | None = None  # None: the compute dtype
    deadline_ms: float | None = None  # None: derived online from measured latency
    # the static plan: the groups carrying this share of the calibrated significance of each
    # layer half are critical and stay on the coordinator
    coordinator_share: float = 0.8
    # with a predictor, per token: the groups carrying this share of the predicted
    # significance must arrive (a missing one is computed by the coordinator)
    critical_share: float = 0.98
    # attention groups per layer (None: one per KV head). Default 1: a single group carrying
    # all of a layer's attention, hence always critical and kept on the coordinator. Losing a
    # KV-head group costs far more than losing MLP neurons (docs/runtime.md).
    attn_groups: int | None = 1
    mlp_groups: int = 16
    mtu: int = protocol.DEFAULT_MTU
    dead_after_s: float = 2.0  # silence after which a worker is declared dead
    join_timeout_s: float = 30.0
    rejoin_every_s: float = 2.0  # how often a lost worker's address is tried again
    drop_rates: Sequence[float] = ()  # user-space loss per worker (no kernel testbed)
    # a ready-made placement (benchmarks, the scheduler); None: by `placement`
    plan: Callable[[Partition, dict], Placement] | None = None
    # static: critical groups on the coordinator, the rest spread evenly over the workers;
    # equal: every layer half dealt out equally over all devices (distributed-llama);
    # memory: in proportion to the devices' memory (exo, llama.cpp); halo: the scheduler,
    # from measured device and link profiles, re-planned as they drift
    placement: str = "static"
    memory_budget: int | None = None  # the coordinator's, in bytes (None: from free RAM)
    replan_every: int = 8  # decode tokens between re-planning checks (halo placement)
    hysteresis: float = 0.15  # adopt a new plan only if predicted this much faster
    reliable_loss: float = 0.02  # links missing at most this share of rounds are reliable
    max_lost_share: float = 0.05  # bound on the expected significance lost per round
    # halo placement: a worker may be given more groups than its memory budget holds and
    # stream the rest from its model file every token (issue 7's loader), at its measured
    # loading speed; False: budgets are hard limits
    streaming: bool = True
    # the semantic-aware predictor: a file path, "auto" (the one `halo calibrate` saved for
    # the model, if any) or None (no per-token prediction: the static plan decides)
    predictor: str | None = "auto"

    def validate(self) -> None:
        """HaloError for an option out of range (before anything slow starts)."""
        if self.mode not in MODES:
            raise HaloError(f"--sync must be one of {', '.join(MODES)}")
        if self.placement not in PLACEMENTS:
            raise HaloError(f"--placement must be one of {', '.join(PLACEMENTS)}")
        for name in ("critical_share", "coordinator_share", "hysteresis", "reliable_loss",
                     "max_lost_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise HaloError(f"--{name.replace('_', '-')} must be between 0 and 1")
        if self.replan_every < 1:
            raise HaloError("--replan-every must be at least 1")


@dataclass
class WorkerLink:
    index: int
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

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def udp_addr(self) -> Address:
        return (self.host, self.port)


class History:
    """The attention input of every layer at every position of the current request: what a
    worker needs to rebuild keys and values it missed (repair) or never had (takeover)."""

    def __init__(self, n_layers: int, dim: int) -> None:
        self.x = [torch.zeros(256, dim) for _ in range(n_layers)]
        self.length = [0] * n_layers

    def reset(self) -> None:
        self.length = [0] * len(self.length)

    def record(self, layer: int, start: int, x: torch.Tensor) -> None:
        end = start + x.shape[0]
        buf = self.x[layer]
        if end > buf.shape[0]:
            grown = torch.zeros(max(end, 2 * buf.shape[0]), buf.shape[1])
            grown[: buf.shape[0]] = buf
            self.x[layer] = buf = grown
        buf[start:end] = x.float()
        self.length[layer] = max(self.length[layer], end)

    def rows(self, layer: int, start: int, end: int) -> torch.Tensor:
        return self.x[layer][start:end]


class Coordinator:
    """Joins the workers, places the groups, and decodes (it is a generate.Decoder)."""

    def __init__(self, model: str | None, dtype: str | None, workers: Sequence[Address],
                 key: bytes, options: ClusterOptions,
                 log: Callable[[str], None] | None = None) -> None:
        options.validate()
        self.log = log or (lambda msg: print(f"[halo] {msg}", file=sys.stderr, flush=True))
        self.opts, self.key = options, key
        self.dtype = parse_dtype(dtype)
        self.source = open_source(model)
        self.config = self.source.config
        self.tokenizer = open_tokenizer(self.source)
        self.model_hash = content_hash(Path(self.source.path))
        self.wire = WIRE_NAMES[options.wire] if options.wire else wire_for_dtype(self.dtype)
        self.session = secrets.randbits(32)
        self.epoch, self.request = 0, 0
        self.stats = SyncStats(mode=options.mode)
        self.deadline = DeadlineEstimator(fixed_ms=options.deadline_ms)
        self.udp = UdpEndpoint("0.0.0.0", 0, key, options.mtu)
        self.ctx = zmq.Context.instance()
        self.links = [WorkerLink(i + 1, h, p) for i, (h, p) in enumerate(workers)]
        for link, rate in zip(self.links, options.drop_rates, strict=False):
            self.udp.drop_from[link.udp_addr] = rate
        self._sent_at: dict[RoundTag, float] = {}
        self._taken: dict[int, list[tuple[int, str, Any]]] = {}
        self._last_control = 0.0
        self._position = 0
        self._owner: dict[tuple[int, str], np.ndarray] = {}
        self._fallback: dict[tuple[int, int, int], MlpShard] = {}
        self._retried: set[RoundTag] = set()
        self._sent_wall = 0.0  # when the current round's activation went out
        self._force_replan = False
        try:
            partition = Partition.contiguous(self.config, options.attn_groups, options.mlp_groups)
            self.predictor = self._load_predictor(partition)
            if self.predictor is not None:
                partition = self.predictor.partition
                self._shares = {k: SharePredictor(n) for k, n in self.predictor.nets.items()}
                ranking = self.predictor.static_ranking()
            else:
                ranking = cached_ranking(self.model_hash, self.config, self.source.tensor,
                                         partition, self.tokenizer.encode(RANKING_TEXT))
            self._partition, self._ranking = partition, ranking
            for link in self.links:
                self._join(link, options.join_timeout_s)
            self.replans: list[dict[str, Any]] = []
            self.profile = DeviceProfile("coordinator", 0.0, memory_budget(options.memory_budget))
            if options.plan is not None:
                self.placement = options.plan(partition, ranking)
            elif options.placement == "equal":
                self.placement = equal_plan(partition, len(self.links) + 1)
            elif options.placement == "static":
                self.placement = static_plan(partition, ranking, len(self.links),
                                             options.coordinator_share)
            else:
                self.profile.bench_speed = compute_benchmark(self.config, self.source.tensor)
                plan = self._plan()
                self.placement = plan.placement
                self.replans.append({"position": 0, "reason": "initial",
                                     "predicted_ms": round(plan.predicted_ms, 3),
                                     "solve_ms": round(plan.solve_ms, 1),
                                     "groups_per_device":
                                         self.placement.summary()["groups_per_device"]})
            self.initial_placement = self.placement
            self.model = self._build_model()
            self.history = History(self.config.n_layers, self.config.hidden_size)
            self._tokens_since_plan = 0
            # the first plan knows no link yet: the first check may replace it
            self._tokens_since_adopt = DWELL_CHECKS * options.replan_every
            self._distribute()
        except BaseException:
            self.close()
            raise

    def _load_predictor(self, partition: Partition) -> predictor_store.Predictor | None:
        """The predictor to use, checked against this model and the asked group counts (its
        own partition may order neurons differently; the counts must agree)."""
        choice = self.opts.predictor
        if choice is None:
            return None
        explicit = choice != "auto"
        path = Path(choice) if explicit else predictor_store.find(Path(self.source.path),
                                                                  self.model_hash)
        if path is None:
            if self.opts.mode == "relaxed":
                self.log("no predictor for this model (make one with `halo calibrate`); "
                         "criticality comes from the static plan")
            return None
        pred = predictor_store.load(path)
        try:
            pred.check(self.model_hash, where=str(path))
            if [(len(a.attn), len(a.mlp)) for a in pred.partition.layers] != \
                    [(len(b.attn), len(b.mlp)) for b in partition.layers]:
                pred.check(self.model_hash, partition, where=str(path))
        except HaloError as exc:
            if explicit:
                raise
            self.log(f"not using {path}: {exc}")
            return None
        return pred

    # -- joining and planning ------------------------------------------------------------
    def _connect(self, link: WorkerLink) -> None:
        if link.sock is not None:
            link.sock.close(0)
        link.sock = self.ctx.socket(zmq.DEALER)
        link.sock.setsockopt(zmq.LINGER, 0)
        link.sock.connect(f"tcp://{link.host}:{link.port}")

    def _hello(self, link: WorkerLink) -> str:
        nonce = secrets.token_hex(16)
        udp_host = local_address_towards(link.host, link.port)
        link.sock.send_multipart(control.pack(
            self.key, "hello", version=control.PROTOCOL_VERSION, session=self.session,
            nonce=nonce, model_hash=self.model_hash, udp=[udp_host, self.udp.port],
            proof=control.join_proof(self.key, "coordinator", nonce, self.model_hash)))
        return nonce

    def _join(self, link: WorkerLink, timeout_s: float) -> None:
        self._connect(link)
        nonce = self._hello(link)
        header = self._await(link, {"welcome", "refused"}, timeout_s, joining=True)
        if header is None:
            raise HaloError(f"worker {link.name} did not answer within {timeout_s:.0f}s "
                            "(is `halo worker` running there, and reachable?)")
        self._check_welcome(link, header, nonce)

    def _check_welcome(self, link: WorkerLink, header: dict[str, Any], nonce: str) -> None:
        if header["kind"] == "refused":
            raise HaloError(f"worker {link.name} refused to join: {header.get('reason')}")
        if header.get("proof") != control.join_proof(self.key, "worker", nonce,
                                                       self.model_hash):
            raise HaloError(f"worker {link.name} could not prove it holds the cluster key")
        link.alive, link.last_seen = True, time.monotonic()
        link.info = {"cores": header.get("cores"), "threads": header.get("threads")}
        if link.profile is None:
            link.profile = DeviceProfile(link.name, float(header.get("speed") or 0.0),
                                         int(header.get("memory") or available_memory_bytes()),
                                         load_speed=float(header.get("load_speed") or 0.0))

    def _await(self, link: WorkerLink, kinds: set[str], timeout_s: float,
               joining: bool = False) -> dict[str, Any] | None:
        """Block for a control message of one of `kinds` from link (others are handled)."""
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not link.sock.poll(int(min(left, 0.25) * 1000) + 1):
                continue
            frames = link.sock.recv_multipart()
            if len(frames) == 1 and frames[0][:2] == protocol.MAGIC:
                self.stats.late += 1  # a strict-mode partial of a round already closed
                continue
            try:
                header, blobs = control.unpack(self.key, frames)
            except ProtocolError as exc:
                if joining and exc.reason == "unauthenticated" and b"wrong cluster key" in \
                        frames[0]:
                    raise HaloError(f"worker {link.name} refused to join: wrong cluster key "
                                    "(give both sides the same --key or HALO_KEY)") from exc
                self.stats.datagrams[exc.reason] += 1
                continue
            if header.get("session") not in (None, self.session):
                continue
            if header["kind"] in kinds:
                link.last_seen = time.monotonic()
                return header
            self._on_control(link, header, blobs)
        return None

    # -- the scheduler -------------------------------------------------------------------
    def _device_specs(self) -> tuple[list[DeviceSpec], list[int]]:
        """The coordinator and the live workers as the scheduler sees them now: measured
        speed and memory, and for a worker what taking part in a round costs besides
        compute -- the round trip (live; a LAN guess before any round) plus, for a link that
        misses rounds, the expected wait for the deadline. A missed contribution is also
        computed again by the coordinator when critical (counted as if it always were):
        a link's effective speed is 1 / (1/speed + miss rate/coordinator speed)."""
        bytes_per_unit = group_nbytes(self.config, "mlp", 1, self.dtype)
        specs = [DeviceSpec("coordinator", self.profile.speed,
                            self.profile.memory_bytes / bytes_per_unit)]
        index = [COORDINATOR]
        deadline = self.deadline.deadline_ms()
        for link in self.links:
            if not link.alive or link.profile is None or link.profile.speed <= 0:
                continue
            est = link.estimate
            own = self._units_per_round(link.index) / link.profile.speed
            rtt = DEFAULT_RTT_MS if est.delay_ms is None else max(0.05, est.delay_ms - own)
            speed = 1.0 / (1.0 / link.profile.speed + est.miss_rate / self.profile.speed)
            specs.append(DeviceSpec(link.name, speed,
                                    link.profile.memory_bytes / bytes_per_unit,
                                    loss=est.miss_rate,
                                    latency=rtt + est.miss_rate * deadline,
                                    load_speed=link.profile.load_speed
                                    if self.opts.streaming else 0.0))
            index.append(link.index)
        return specs, index

    def _units_per_round(self, device: int) -> float:
        """Mean MLP neurons the device computes per round it takes part in (placement now)."""
        p = getattr(self, "placement", None)
        if p is None:
            return 0.0
        sizes = [len(p.units_of(device, i, "mlp")) for i in range(self.config.n_layers)]
        used = [n for n in sizes if n]
        return sum(used) / len(used) if used else 0.0

    def _plan(self, current: Placement | None = None) -> PlanResult:
        """A placement by the `memory` or `halo` policy over the live devices (and, given
        the current one, its predicted time on the same measurements)."""
        specs, index = self._device_specs()
        return solved_plan(
            self._partition, self._ranking, self.opts.coordinator_share, specs, self.config,
            self.opts.placement, index, len(self.links) + 1,
            reliable_loss=self.opts.reliable_loss, max_lost_share=self.opts.max_lost_share,
            current=current)

    def _maybe_replan(self) -> None:
        """Between tokens (halo placement): every `replan_every` tokens, plan again from the
        profiles as measured now; adopt the new plan if a worker came or went, or if it is
        predicted at least `hysteresis` faster than the current one (so it does not flap)."""
        if self.opts.placement != "halo" or self.opts.plan is not None:
            return
        self._tokens_since_plan += 1
        self._tokens_since_adopt += 1
        alive = {lk.index for lk in self.links if lk.alive}
        holders = {d for d in range(1, len(self.links) + 1) if self.placement.count(d)}
        changed = bool(holders - alive) or bool(self._taken) or self._force_replan
        self._force_replan = False
        if not changed and self._tokens_since_plan < self.opts.replan_every:
            return
        if not changed and self._tokens_since_adopt < DWELL_CHECKS * self.opts.replan_every:
            return  # a plan stays at least this long unless a device comes or goes
        self._tokens_since_plan = 0
        try:
            plan = self._plan(current=self.placement)
        except HaloError as exc:
            self.log(f"re-planning failed, keeping the current plan: {exc}")
            return
        current = plan.current_ms if plan.current_ms is not None else float("inf")
        if not changed and plan.predicted_ms > (1 - self.opts.hysteresis) * current:
            return
        self._adopt(plan.placement, {
            "position": self._position, "predicted_ms": round(plan.predicted_ms, 3),
            "previous_ms": round(current, 3) if current != float("inf") else None,
            "solve_ms": round(plan.solve_ms, 1),
            "reason": "membership" if changed else "faster"})

    def _adopt(self, placement: Placement, record: dict[str, Any]) -> None:
        """Move groups between tokens: the coordinator rebuilds its own shards where its
        units changed (attention shards refilled from the token history), the workers get
        the new plan, and those whose attention groups changed get their KV by replay."""
        t0 = time.perf_counter()
        old = self.placement
        for i, layer in enumerate(self.model.layers):
            assert layer is not None
            for kind in ("attn", "mlp"):
                units = placement.units_of(COORDINATOR, i, kind)
                shards = getattr(layer, kind)
                if units == old.units_of(COORDINATOR, i, kind) and not self._taken:
                    continue
                if kind == "mlp":
                    new = [mlp_shard(self.source, i, units, self.dtype)] if units else []
                else:
                    keep = [sh for sh in shards if sh.kv_heads == units]
                    if keep:
                        new = keep[:1]
                    elif units:
                        sh = attention_shard(self.source, self.config, i, units,
                                             self.dtype, self.model.rope)
                        n = self.history.length[i]
                        if n:
                            sh.fill_cache(self.history.rows(i, 0, n).to(self.dtype), 0)
                        new = [sh]
                    else:
                        new = []
                setattr(layer, kind, new)
        self._taken.clear()
        moved_attn = [link for link in self.links if link.alive and any(
            placement.units_of(link.index, i, "attn") != old.units_of(link.index, i, "attn")
            for i in range(self.config.n_layers))]
        self._set_placement(placement)
        self._tokens_since_adopt = 0
        self.epoch += 1
        self._distribute()
        for link in moved_attn:
            self._send_replay(link)
        record["ms"] = round(1e3 * (time.perf_counter() - t0), 1)
        record["groups_per_device"] = placement.summary()["groups_per_device"]
        self.replans.append(record)
        self.log(f"re-planned at position {self._position} ({record['reason']}): groups per "
                 f"device {record['groups_per_device']}, predicted {record['predicted_ms']} "
                 f"ms/token of rounds ({record['ms']:.0f} ms to move)")

    def _build_model(self) -> Transformer:
        p = self.placement
        return Transformer(
            self.config, self.source.tensor, self.dtype,
            attn_sets=[[u] if (u := p.units_of(COORDINATOR, i, "attn")) else []
                       for i in range(self.config.n_layers)],
            mlp_sets=[[u] if (u := p.units_of(COORDINATOR, i, "mlp")) else []
                      for i in range(self.config.n_layers)])

    def _send_plan(self, link: WorkerLink) -> None:
        link.sock.send_multipart(control.pack(
            self.key, "plan", session=self.session, epoch=self.epoch, device=link.index,
            dtype=dtype_name(self.dtype), wire=self.wire, request=self.request,
            layers=self.placement.device_json(link.index)))

    def _distribute(self, timeout_s: float = 120.0) -> None:
        live = [link for link in self.links if link.alive]
        for link in live:
            self._send_plan(link)
        for link in live:
            header = self._await(link, {"ready"}, timeout_s)
            if header is None:
                raise HaloError(f"worker {link.name} did not load its groups within "
                                f"{timeout_s:.0f}s")
            if header.get("error"):
                raise HaloError(f"worker {link.name} cannot take its groups: "
                                f"{header['error']} (give it a larger --memory-budget, or "
                                "use --placement memory|halo)")

    # -- decoding ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_last(self, ids: Sequence[int], start: int) -> torch.Tensor:
        if start == 0:
            self.request += 1
            self.history.reset()
            self._sent_at.clear()
        self._position = start
        self._check_links()
        if len(ids) == 1:
            self._maybe_replan()
        before = self.stats.mark()
        T = len(ids)
        h = self.model.embed(torch.as_tensor(list(ids), dtype=torch.long))
        for i, layer in enumerate(self.model.layers):
            assert layer is not None
            x = layer.attn_input(h)
            self.history.record(i, start, x)
            h = h + self._round(i, ATTN, x, start, T, layer.attn)
            x = layer.mlp_input(h)
            h = h + self._round(i, MLP, x, start, T, layer.mlp)
        self.stats.token_done(start, before)
        self.stats.deadline_ms = self.deadline.deadline_ms()
        return self.model.logits(h[-1:])[-1]

    def _round(self, layer: int, phase: int, x: torch.Tensor, start: int, T: int,
               shards: list) -> torch.Tensor:
        kind = KIND_OF[phase]
        targets = [self.links[d - 1] for d in self.placement.devices_in(layer, kind)]
        targets = [t for t in targets if t.alive]
        tag = RoundTag(self.session, self.epoch, self.request, start, T, layer, phase)
        if targets:
            body = encode_body(x, self.wire)
            if self.opts.mode == "strict":
                data = protocol.encode(ACTIVATION, 0, self.wire, tag, body, self.key,
                                       mtu=1 << 30)[0]
                for t in targets:
                    t.sock.send(data)
            else:
                self.udp.send(ACTIVATION, 0, self.wire, tag, body, [t.udp_addr for t in targets])
        self._sent_wall = time.perf_counter()
        partials = [s.forward(x, start) for s in shards]
        if targets:
            def resend(link: WorkerLink) -> None:
                self.udp.send(ACTIVATION, 0, self.wire, tag, body, [link.udp_addr])

            partials += self._gather(tag, kind, targets, time.perf_counter(), x,
                                     resend if self.opts.mode == "relaxed" else None)
        self.stats.rounds += 1
        if not partials:
            return torch.zeros(T, self.config.hidden_size)
        return sum_partials(partials)

    def _critical_links(self, layer: int, kind: str, x: torch.Tensor,
                        targets: list[WorkerLink]) -> set[int]:
        """Workers whose contribution this round must arrive: all in strict mode and in
        multi-token (prompt) rounds, whose hidden states feed every later token; with a
        predictor, those holding a group among the smallest set that carries
        `critical_share` of this token's predicted significance; else the static plan's.
        Called only when a contribution is still missing at the deadline: a round whose
        contributions all arrive in time needs no prediction."""
        if self.opts.mode == "strict" or x.shape[0] > 1:
            return {t.index for t in targets}
        if self.predictor is None:
            return {t.index for t in targets if self.placement.is_critical(t.index, layer, kind)}
        if self.opts.critical_share <= 0:
            return set()
        t0 = time.perf_counter()
        shares = self._shares[kind].shares(layer, x)
        owner = self._owner.get((layer, kind))
        if owner is None:
            owner = self._owner[(layer, kind)] = np.array(
                [self.placement.owner[GroupId(layer, kind, j)]  # type: ignore[arg-type]
                 for j in range(shares.shape[-1])])
        devices = critical_devices(shares, self.opts.critical_share, owner)
        out = {t.index for t in targets if t.index in devices}
        self.stats.predict_ms += 1e3 * (time.perf_counter() - t0)
        self.stats.predictions += 1
        return out

    def _gather(self, tag: RoundTag, kind: str, targets: list[WorkerLink], ready: float,
                x: torch.Tensor, resend: Callable[[WorkerLink], None] | None = None
                ) -> list[torch.Tensor]:
        """Collect the workers' partials. `ready` is when the coordinator's own share was done:
        the deadline counts from there, and so do the delays it learns from (what matters is
        how long the coordinator idles, not how long the worker took). At the deadline, the
        contributions still missing are sorted into critical and not (_critical_links); a
        critical MLP contribution is computed by the coordinator itself (stateless, and the
        weights are memory-mapped); a critical attention contribution is asked for again
        (the activation re-sent, the interval doubling) until it arrives or its worker is
        declared dead; the others count as lost."""
        sent = ready
        pending = {t.index: t for t in targets}
        got: list[torch.Tensor] = []
        self.stats.expected += len(pending)
        self._sent_at[tag] = sent
        if len(self._sent_at) > 512:
            self._sent_at.pop(next(iter(self._sent_at)))
        if len(self._retried) > 512:
            self._retried.clear()
        wait_start = time.perf_counter()
        deadline = sent + self.deadline.deadline_ms(tag.ntok) / 1e3
        critical: set[int] | None = None
        interval = max(deadline - sent, 1e-3)
        next_retry = deadline
        poller = None
        if self.opts.mode == "strict":
            poller = zmq.Poller()
            for link in pending.values():
                poller.register(link.sock, zmq.POLLIN)
        while pending:
            now = time.perf_counter()
            if now < deadline:
                timeout = min(0.05, deadline - now)
            else:
                if critical is None:
                    if tag.ntok == 1:  # what the scheduler learns: these missed the deadline
                        for link in pending.values():
                            link.estimate.observe(False)
                    critical = self._critical_links(tag.layer, kind, x, targets)
                    if critical & pending.keys():
                        self.stats.critical_waits += 1
                crit_pending = critical & pending.keys()
                if not crit_pending:
                    break
                if tag.phase == MLP and self.opts.mode == "relaxed":
                    for i in crit_pending:
                        got.append(self._compute_fallback(pending.pop(i), tag, x))
                    continue
                if resend is not None and now >= next_retry:
                    for i in crit_pending:
                        resend(pending[i])
                    self.stats.retries += len(crit_pending)
                    self._retried.add(tag)
                    interval = min(2 * interval, 0.05)
                    next_retry = now + interval
                timeout = min(0.05, next_retry - now) if resend is not None else 0.05
                for i in crit_pending:
                    link = pending[i]
                    if time.monotonic() - link.last_seen > self.opts.dead_after_s:
                        pending.pop(i)
                        self._take_over(link, "no heartbeat")
                        got.append(self._compute_taken(link.index, tag, x))
                if not pending:
                    break
            if poller is not None:
                self._wait_strict(poller, pending, timeout, tag, got, sent)
            else:
                ready, _, _ = select.select([self.udp.sock], [], [], max(0.0, timeout))
                if ready:
                    for msg in self.udp.receive():
                        self._on_partial(msg.kind, msg.sender, msg.wire, msg.tag, msg.body,
                                         tag, pending, got, sent)
                if now - self._last_control > 0.005 or now >= deadline:
                    self._poll_control()
        self.stats.waited_ms += 1e3 * (time.perf_counter() - wait_start)
        self.stats.lost += len(pending)
        return got

    def _wait_strict(self, poller: zmq.Poller, pending: dict[int, WorkerLink], timeout: float,
                     tag: RoundTag, got: list[torch.Tensor], sent: float) -> None:
        for sock, _ in poller.poll(max(1, int(timeout * 1000))):
            link = next(lk for lk in self.links if lk.sock is sock)
            self._drain(link, lambda data, t=tag: self._on_strict_data(data, t, pending, got,
                                                                       sent))

    def _on_strict_data(self, data: bytes, tag: RoundTag, pending: dict[int, WorkerLink],
                        got: list[torch.Tensor], sent: float) -> None:
        try:
            frag = protocol.decode(data, self.key)
        except ProtocolError as exc:
            self.stats.datagrams[exc.reason] += 1
            return
        self._on_partial(frag.kind, frag.sender, frag.wire, frag.tag, frag.payload, tag,
                         pending, got, sent)

    def _on_partial(self, kind: int, sender: int, wire: int, msg_tag: RoundTag, body: bytes,
                    tag: RoundTag, pending: dict[int, WorkerLink], got: list[torch.Tensor],
                    sent: float) -> None:
        now = time.perf_counter()
        if kind != PARTIAL:
            self.stats.datagrams["unexpected_kind"] += 1
            return
        if msg_tag != tag or sender not in pending:
            earlier = self._sent_at.get(msg_tag)
            if earlier is not None and msg_tag.session == self.session:
                self.stats.late += 1
                if msg_tag not in self._retried:  # a retry's answer says nothing of delay
                    self.deadline.observe(1e3 * (now - earlier))
            else:
                self.stats.datagrams["stale"] += 1
            return
        try:
            _, part = decode_body(body, wire, tag.ntok, self.config.hidden_size)
        except ProtocolError as exc:
            self.stats.datagrams[exc.reason] += 1
            return
        link = pending.pop(sender)
        link.last_seen = time.monotonic()
        got.append(part)
        self.stats.received += 1
        if tag.ntok == 1:
            self.deadline.observe(1e3 * (now - sent))
            if msg_tag not in self._retried:  # in time (an answer to a retry was a miss)
                link.estimate.observe(True, 1e3 * (now - self._sent_wall))

    # -- control traffic -----------------------------------------------------------------
    def _drain(self, link: WorkerLink, on_data: Callable[[bytes], None] | None = None) -> None:
        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 1 and frames[0][:2] == protocol.MAGIC:
                if on_data is not None:
                    on_data(frames[0])
                else:
                    self.stats.late += 1  # a strict-mode partial of a closed round
                continue
            try:
                header, blobs = control.unpack(self.key, frames)
            except ProtocolError as exc:
                self.stats.datagrams[exc.reason] += 1
                continue
            if header.get("session") != self.session:
                continue
            link.last_seen = time.monotonic()
            self._on_control(link, header, blobs)

    def _poll_control(self) -> None:
        self._last_control = time.perf_counter()
        for link in self.links:
            if link.alive:
                self._drain(link)

    def _on_control(self, link: WorkerLink, h: dict[str, Any], blobs: list[bytes]) -> None:
        kind = h["kind"]
        if kind == "heartbeat":
            stats = h.get("stats", {})
            if link.profile is not None and isinstance(stats, dict):
                before = link.heartbeat
                link.profile.observe_compute(
                    float(stats.get("mlp_neurons", 0)) - float(before.get("mlp_neurons", 0)),
                    float(stats.get("mlp_ms", 0.0)) - float(before.get("mlp_ms", 0.0)))
            link.heartbeat = stats
        elif kind == "need" and h.get("request") == self.request:
            self._send_repair(link, int(h["layer"]), [int(p) for p in h["positions"]])

    def _send_repair(self, link: WorkerLink, layer: int, positions: list[int]) -> None:
        known = [p for p in sorted(set(positions)) if p < self.history.length[layer]]
        for start, n in _runs(known):
            x = self.history.rows(layer, start, start + n)
            link.sock.send_multipart(control.pack(
                self.key, "kv", [control.tensor_blob(x)], session=self.session,
                request=self.request, layer=layer, start=start, n=n, replay=False))
            self.stats.repairs_served += n

    def _send_replay(self, link: WorkerLink) -> None:
        for layer in range(self.config.n_layers):
            n = self.history.length[layer]
            if n and self.placement.units_of(link.index, layer, "attn"):
                link.sock.send_multipart(control.pack(
                    self.key, "kv", [control.tensor_blob(self.history.rows(layer, 0, n))],
                    session=self.session, request=self.request, layer=layer, start=0, n=n,
                    replay=True))

    # -- faults: takeover and rejoin -----------------------------------------------------
    def _check_links(self) -> None:
        self._poll_control()
        now = time.monotonic()
        for link in self.links:
            if link.alive and now - link.last_seen > self.opts.dead_after_s:
                self._take_over(link, "no heartbeat")
            elif not link.alive and now - link.last_attempt > self.opts.rejoin_every_s:
                self._try_rejoin(link)

    def _take_over(self, link: WorkerLink, reason: str) -> None:
        """The coordinator computes a dead worker's groups from now on; attention groups
        get their KV cache back by replaying the token history (as Petals does)."""
        t0 = time.perf_counter()
        link.alive = False
        link.last_attempt = time.monotonic()
        taken = []
        for layer in range(self.config.n_layers):
            target = self.model.layers[layer]
            assert target is not None
            units = self.placement.units_of(link.index, layer, "attn")
            if units:
                shard = attention_shard(self.source, self.config, layer, units,
                                        self.dtype, self.model.rope)
                n = self.history.length[layer]
                if n:
                    shard.fill_cache(self.history.rows(layer, 0, n).to(self.dtype), 0)
                target.attn.append(shard)
                taken.append((layer, "attn", shard))
            units = self.placement.units_of(link.index, layer, "mlp")
            if units:
                shard = mlp_shard(self.source, layer, units, self.dtype)
                target.mlp.append(shard)
                taken.append((layer, "mlp", shard))
        self._taken[link.index] = taken
        groups = self.placement.count(link.index)
        self._set_placement(self.placement.moved(link.index, COORDINATOR))
        self.epoch += 1
        self._distribute()
        ms = 1e3 * (time.perf_counter() - t0)
        self.stats.takeovers.append({"worker": link.name, "reason": reason,
                                     "position": self._position, "groups": groups,
                                     "ms": round(ms, 1)})
        self.log(f"worker {link.name} lost ({reason}); the coordinator took over its {groups} "
                 f"groups in {ms:.0f} ms")

    def _compute_taken(self, index: int, tag: RoundTag, x: torch.Tensor) -> torch.Tensor:
        """The current round's contribution of groups just taken over from worker `index`."""
        kind = KIND_OF[tag.phase]
        parts = [s.forward(x, tag.pos) for (layer, k, s) in self._taken.get(index, [])
                 if layer == tag.layer and k == kind]
        self.stats.recomputed += 1
        return sum_partials(parts) if parts else torch.zeros_like(x, dtype=torch.float32)

    def _set_placement(self, placement: Placement) -> None:
        """A new placement, and nothing derived from the old one (group owners per layer,
        fallback shards)."""
        self.placement = placement
        self._owner.clear()
        self._fallback.clear()

    def _compute_fallback(self, link: WorkerLink, tag: RoundTag, x: torch.Tensor
                          ) -> torch.Tensor:
        """A critical MLP contribution missing at the deadline, computed by the coordinator
        from the memory-mapped weights (the worker's shard for this layer, built once)."""
        key = (link.index, tag.layer, self.epoch)
        shard = self._fallback.get(key)
        if shard is None:
            units = self.placement.units_of(link.index, tag.layer, "mlp")
            shard = self._fallback[key] = mlp_shard(self.source, tag.layer, units,
                                                    self.dtype)
        self.stats.fallbacks += 1
        return shard.forward(x)

    def _try_rejoin(self, link: WorkerLink) -> None:
        link.last_attempt = time.monotonic()
        self._connect(link)
        nonce = self._hello(link)
        header = self._await(link, {"welcome", "refused"}, 0.2, joining=True)
        if header is None or header["kind"] != "welcome":
            return
        t0 = time.perf_counter()
        try:
            self._check_welcome(link, header, nonce)
        except HaloError as exc:
            self.log(str(exc))
            link.alive = False
            return
        if self.opts.placement == "halo" and self.opts.plan is None:
            link.estimate = LinkEstimate()  # what was measured before it left is stale
            self._force_replan = True  # re-plan at the next token
            self.stats.rejoins.append({"worker": link.name, "position": self._position,
                                       "ms": round(1e3 * (time.perf_counter() - t0), 1)})
            self.log(f"worker {link.name} rejoined; the next token re-plans")
            return
        owner = dict(self.placement.owner)
        for gid, dev in self.initial_placement.owner.items():
            if dev == link.index:
                owner[gid] = link.index
        self._set_placement(Placement(self.placement.partition, owner,
                                      self.placement.critical, self.placement.n_devices))
        for layer, kind, shard in self._taken.pop(link.index, []):
            target = self.model.layers[layer]
            assert target is not None
            getattr(target, kind).remove(shard)
        self.epoch += 1
        self._distribute()
        self._send_replay(link)
        ms = 1e3 * (time.perf_counter() - t0)
        self.stats.rejoins.append({"worker": link.name, "position": self._position,
                                   "ms": round(ms, 1)})
        self.log(f"worker {link.name} rejoined; its groups are back ({ms:.0f} ms)")

    def idle(self) -> None:
        """Between requests (a server): keep the sessions alive (a worker drops a coordinator
        silent for its idle timeout), notice dead workers and let lost ones rejoin."""
        for link in self.links:
            if link.alive:
                link.sock.send_multipart(control.pack(self.key, "ping", session=self.session,
                                                      t=time.time()))
        self._check_links()

    # -- reporting and shutdown ----------------------------------------------------------
    def sync_json(self) -> dict[str, Any]:
        self.stats.datagrams.update(self.udp.counters)
        workers = []
        for link in self.links:
            workers.append({"address": link.name, "alive": link.alive,
                            "groups": self.placement.count(link.index), **link.info,
                            "profile": {**(link.profile.to_json() if link.profile else {}),
                                        **link.estimate.to_json()},
                            "reported": link.heartbeat})
        out = self.stats.to_json(workers)
        out["placement"] = {"policy": "custom" if self.opts.plan else self.opts.placement,
                            **self.placement.summary(), "replans": self.replans}
        if self.profile.bench_speed:
            out["placement"]["coordinator"] = self.profile.to_json()
        out["predictor"] = None if self.predictor is None else {
            "path": self.predictor.path, "critical_share": self.opts.critical_share,
            "grouping": self.predictor.meta.get("grouping")}
        out["wire"] = next(k for k, v in WIRE_NAMES.items() if v == self.wire)
        return out

    def close(self) -> None:
        for link in self.links:
            if link.sock is not None:
                linger = 0
                if link.alive:
                    try:
                        link.sock.send_multipart(control.pack(self.key, "bye",
                                                              session=self.session),
                                                 zmq.NOBLOCK)
                        linger = 200
                    except zmq.ZMQError:
                        pass
                link.sock.close(linger)
                link.sock = None
        self.udp.close()


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> (start, length) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out
