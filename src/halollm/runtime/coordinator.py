"""The coordinator: device 0 of a cluster, and the distributed `generate.Decoder`.

It wires the parts and owns the placement: the model runs its one layer loop with each layer
half reduced by a synchronisation round (rounds.py) over the links to the workers
(links.py); the token history (history.py) serves KV repair and replay; between tokens --
never inside a round -- it applies every placement change in one place (`_change`): a
takeover of a dead worker, a rejoin, a re-plan (planner.py).
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from halollm.errors import HaloError
from halollm.groups import MLP_GROUPS, Partition
from halollm.model.formats import Weights, resolve_format
from halollm.model.llama import Half, Layer, Transformer
from halollm.model.loader import content_hash, open_source, open_tokenizer
from halollm.predictor import store as predictor_store
from halollm.predictor.critical import SharePredictor
from halollm.predictor.significance import RANKING_TEXT, cached_ranking
from halollm.runtime.deadline import DeadlineEstimator
from halollm.runtime.device_bench import compute_benchmark
from halollm.runtime.head_split import HeadSplit
from halollm.runtime.history import History
from halollm.runtime.keys import ClusterKey
from halollm.runtime.links import Dead, Links, Rejoined, RepairNeeded, WorkerLink
from halollm.runtime.messages import Bye, Ping, Plan, Ready
from halollm.runtime.options import ClusterOptions
from halollm.runtime.own_share import Criticality, OwnShare
from halollm.runtime.planner import Planner
from halollm.runtime.probe import ProbeResult, probe_links
from halollm.runtime.protocol import HEAD, RoundTag
from halollm.runtime.rounds import Rounds, TcpTransport, UdpTransport, WorkerLost
from halollm.runtime.stats import SyncStats
from halollm.runtime.tensor_codec import WIRE_NAMES, wire_for_dtype
from halollm.runtime.transport import Address, UdpEndpoint
from halollm.scheduler.placement import COORDINATOR, Placement
from halollm.scheduler.profile import DeviceProfile, LinkEstimate, memory_budget

PLAN_TIMEOUT_S = 120.0  # how long a worker may take to build the shards of a new plan


class Coordinator:
    """Joins the workers, places the groups, and decodes (it is a generate.Decoder)."""

    def __init__(self, model: str | None, dtype: str | None, workers: Sequence[Address],
                 key: ClusterKey, options: ClusterOptions,
                 log: Callable[[str], None] | None = None, quant: str | None = None) -> None:
        """`dtype`, `quant`: the weight format (formats.resolve_format), the same on every
        device: the workers get it with their plans."""
        options.validate()
        self.log = log or (lambda msg: print(f"[halo] {msg}", file=sys.stderr, flush=True))
        self.opts = options
        self.source = open_source(model)
        self.format = resolve_format(self.source, dtype, quant)
        self.dtype = self.format.dtype
        self.weights = Weights(self.source, self.format, partial=True)
        self.config = self.source.config
        self.tokenizer = open_tokenizer(self.source)
        self.model_hash = content_hash(Path(self.source.path))
        wire = options.sync.wire
        self.wire = WIRE_NAMES[wire] if wire else wire_for_dtype(self.dtype)
        self.session = secrets.randbits(32)
        self.epoch = self.position = 0
        self.taken: set[int] = set()  # workers whose groups the coordinator computes now
        self.probed: ProbeResult | None = None  # what the probe before the first plan saw
        self.stats = SyncStats(mode=options.sync.mode)
        self.deadline = DeadlineEstimator(fixed_ms=options.sync.deadline_ms)
        self.udp = UdpEndpoint("0.0.0.0", 0, lambda sender, session:
                               self.links.data_channel(sender, session), options.links.mtu)
        self.udp.coalesce_s = options.sync.coalesce_us / 1e6
        self.links = Links(workers, key, self.session, self.model_hash, self.udp.port,
                           options.links, self.stats, self.log, self.format.name)
        for link, rate in zip(self.links.links, options.links.drop_rates, strict=False):
            self.udp.drop_from[link.udp_addr] = rate
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        plan = self.opts.plan
        partition = Partition.contiguous(self.config, self._attn_groups(), self._mlp_groups())
        self.predictor = self._load_predictor(partition)
        shares = None
        if self.predictor is not None:
            partition = self.predictor.partition
            shares = {k: SharePredictor(n) for k, n in self.predictor.nets.items()}
            ranking = self.predictor.static_ranking()
        else:
            ranking = cached_ranking(self.model_hash, self.config, self.source.tensor,
                                     partition, self.tokenizer.encode(RANKING_TEXT))
        self.links.join_all()
        self.profile = DeviceProfile("coordinator", 0.0, memory_budget(plan.memory_budget))
        if plan.placement in ("memory", "halo") and self.opts.custom_plan is None:
            bench = compute_benchmark(self.config, self.weights)
            self.profile.bench_speed, self.profile.call_ms = bench.speed, bench.call_ms
            self._probe(bench.cpu_share, bench.shard)
        self.planner = Planner(self.opts, partition, ranking, self.config, self.weights,
                               self.profile, self.log)
        self.placement = self.initial_placement = self.planner.initial(self.links.links)
        self.model = self._build_model()
        self.history = History(self.config.n_layers, self.config.hidden_size)
        self.own = OwnShare(self.source, self.model, self.weights, self.stats)
        self.criticality = Criticality(shares, self.opts.sync.critical_share, self.stats)
        self.criticality.set_placement(self.placement)
        strict = self.opts.sync.mode == "strict"
        transport = TcpTransport(self.links, self.stats) if strict else \
            UdpTransport(self.udp, self.links, self.opts.sync.spin_us / 1e6)
        self.rounds = Rounds(transport, self.links, self.session, self.wire,
                             self.config.hidden_size, self.deadline, self.stats,
                             self.criticality, self._fallback)
        self.rounds.hub_round_ms = self.profile.hub_round_ms
        self.head = HeadSplit(self.model, self.rounds, self.stats)
        t0 = time.perf_counter()
        self._distribute()  # the workers build their shards (the coordinator's are built)
        ms = 1e3 * (time.perf_counter() - t0)
        self.planner.moved(ms, None, self.placement)
        if self.planner.replans:  # the first plan's record: what distributing it took
            self.planner.replans[0]["ms"] = round(ms, 1)

    def _probe(self, cpu_share: float, own: object) -> None:
        """Measure each link's round trip and this device's cost of a round, per round and
        per worker, with `own` (the compute benchmark's half of a layer's MLP) as its own
        share (probe.py), for the first plan."""
        transport = TcpTransport(self.links, self.stats) if self.opts.sync.mode == "strict" \
            else UdpTransport(self.udp, self.links)  # no spinning: CPU time is the measure
        self.probed = probe_links(transport, self.links, self.session, self.wire,
                                  self.config.hidden_size, [own], cpu_share)
        for link in self.links.links:
            rtt = self.probed.rtt_ms.get(link.index)
            if rtt is not None:
                link.estimate.probe_ms = rtt
        if self.probed.hub_ms is not None:
            self.profile.hub_ms = self.probed.hub_ms
        self.profile.hub_round_ms = self.probed.round_ms or 0.0
        rtts = sorted(self.probed.rtt_ms.values())
        self.log(f"probe: round trip {rtts[0]:.2f}–{rtts[-1]:.2f} ms; this device's work "
                 f"{self.profile.hub_round_ms:.3f} ms per round + {self.profile.hub_ms:.3f} "
                 "ms per worker" if rtts else "probe: no worker answered")

    def _attn_groups(self) -> int:
        """--attn-groups, or its default: attention split by KV heads over the devices for
        the equal placement (distributed-llama's split), else one group on the coordinator."""
        plan = self.opts.plan
        if plan.attn_groups is not None:
            return plan.attn_groups
        if plan.placement in ("equal", "workers"):
            devices = len(self.links.links) + (plan.placement == "equal")
            return max(1, min(self.config.n_kv_heads, devices))
        return 1

    def _mlp_groups(self) -> int:
        """--mlp-groups, or its default: 16, a multiple of the workers for `workers`."""
        plan, workers = self.opts.plan, len(self.links.links)
        if plan.mlp_groups is not None:
            return plan.mlp_groups
        if plan.placement == "workers" and workers:
            return -(-MLP_GROUPS // workers) * workers
        return MLP_GROUPS

    def _load_predictor(self, partition: Partition) -> predictor_store.Predictor | None:
        """The predictor to use, checked against this model and the asked group counts (its
        own partition may order neurons differently; the counts must agree)."""
        choice = self.opts.sync.predictor
        if choice is None:
            return None
        explicit = choice != "auto"
        path = Path(choice) if explicit else predictor_store.find(Path(self.source.path),
                                                                  self.model_hash)
        if path is None:
            if self.opts.sync.mode == "relaxed":
                self.log("no predictor for this model (make one with `halo calibrate`); "
                         "criticality comes from the static plan")
            return None
        pred = predictor_store.load(path)
        try:
            pred.check(self.model_hash, where=str(path))
            attn_given = self.opts.plan.attn_groups is not None  # else the predictor's

            def counts(p: Partition) -> list[tuple[int, int]]:
                return [(len(lg.attn) if attn_given else 0, len(lg.mlp)) for lg in p.layers]

            if counts(pred.partition) != counts(partition):
                pred.check(self.model_hash, partition, where=str(path))
        except HaloError as exc:
            if explicit:
                raise
            self.log(f"not using {path}: {exc}")
            return None
        return pred

    def _build_model(self) -> Transformer:
        p, n = self.placement, self.config.n_layers
        return Transformer(
            self.config, Weights(self.source, self.format),
            attn_sets=[[u] if (u := p.units_of(COORDINATOR, i, "attn")) else [] for i in range(n)],
            mlp_sets=[[u] if (u := p.units_of(COORDINATOR, i, "mlp")) else [] for i in range(n)])

    # -- decoding ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_last(self, ids: Sequence[int], start: int) -> torch.Tensor:
        if start == 0:
            self.history.start_request()
            self.rounds.request = self.history.request
            self.rounds.sent_at.clear()
        self.position = start
        self._between_tokens(decoding=len(ids) == 1)
        before = self.stats.mark()
        h = self._surviving(lambda: self.model.hidden(list(ids), start, reduce=self._reduce))
        self.stats.token_done(start, before)
        self.stats.deadline_ms = self.deadline.deadline_ms()
        pos = start + len(ids) - 1
        return self._surviving(lambda: self.head.logits(h[-1:], pos, self.links.links))

    def _surviving(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """step(), run again after each takeover of a worker found dead inside it."""
        while True:
            try:
                return step()
            except WorkerLost as lost:  # take it over, then run the step again
                for link in lost.links:
                    self.links.lost(link, "no heartbeat")
                    self._take_over(link, "no heartbeat")

    def _reduce(self, index: int, half: Half, layer: Layer, x: torch.Tensor, start: int
                ) -> torch.Tensor:
        """A layer half's update: one synchronisation round over the devices holding it."""
        if half == "attn":
            self.history.record(index, start, x)
        links = self.links.links
        targets = [t for d in self.placement.devices_in(index, half) if (t := links[d - 1]).alive]
        return self.rounds.run(index, half, x, start, getattr(layer, half), targets)

    def _fallback(self, link: WorkerLink, tag: RoundTag, x: torch.Tensor) -> torch.Tensor:
        if tag.phase == HEAD:
            return self.head.rows(link, tag, x)
        return self.own.fallback(self.placement, link, tag, x)

    # -- between tokens: events and placement changes ------------------------------------
    def _between_tokens(self, decoding: bool) -> None:
        for event in self.links.check():
            match event:
                case Dead(link=link, reason=reason):
                    self._take_over(link, reason)
                case Rejoined(link=link):
                    self._rejoined(link)
                case RepairNeeded(link=link, request=request, layer=layer, positions=pos):
                    if request == self.history.request and link.alive:
                        for msg in self.history.repair(self.session, layer, pos):
                            self.links.send(link, msg)
                            self.stats.repairs_served += msg.n
        if decoding:
            if self.rounds.hub_ms is not None:
                self.profile.hub_ms = self.rounds.hub_ms
            change = self.planner.check(self.links.links, self.placement, bool(self.taken),
                                        self.deadline.deadline_ms(), self.position)
            if change is not None:
                self._adopt(*change)

    def _change(self, new: Placement) -> None:
        """The one place where the placement changes: the coordinator's own shards follow,
        the workers get the new plan, and those whose attention groups changed get their
        keys and values by replaying the history."""
        old, self.placement = self.placement, new
        self.own.apply(new, self.history)
        self.criticality.set_placement(new)
        self.epoch += 1
        self.rounds.epoch = self.epoch
        self._distribute()
        n = self.config.n_layers
        for link in self.links.alive():
            moved = [i for i in range(n) if new.units_of(link.index, i, "attn")
                     != old.units_of(link.index, i, "attn")]
            owned = [i for i in moved if new.units_of(link.index, i, "attn")]
            for msg in self.history.replay(self.session, owned):
                self.links.send(link, msg)

    def _take_over(self, link: WorkerLink, reason: str) -> None:
        """The coordinator computes a dead worker's groups from now on; attention groups get
        their KV cache back from the token history (as Petals does)."""
        t0 = time.perf_counter()
        groups = self.placement.count(link.index)
        self.taken.add(link.index)
        self._change(self.placement.moved(link.index, COORDINATOR))
        ms = 1e3 * (time.perf_counter() - t0)
        self.stats.takeovers.append({"worker": link.name, "reason": reason,
                                     "position": self.position, "groups": groups,
                                     "ms": round(ms, 1)})
        self.log(f"worker {link.name} lost ({reason}); the coordinator took over its {groups} "
                 f"groups in {ms:.0f} ms")

    def _rejoined(self, link: WorkerLink) -> None:
        t0 = time.perf_counter()
        if self.planner.adaptive:
            link.estimate = LinkEstimate()  # what was measured before it left is stale
            self.planner.force = True  # re-plan at the next token
            note = "the next token re-plans"
        else:
            self.taken.discard(link.index)
            self._change(self.planner.restored(self.placement, self.initial_placement,
                                               link.index))
            note = "its groups are back"
        ms = 1e3 * (time.perf_counter() - t0)
        self.stats.rejoins.append({"worker": link.name, "position": self.position,
                                   "ms": round(ms, 1)})
        self.log(f"worker {link.name} rejoined; {note} ({ms:.0f} ms)")

    def _adopt(self, placement: Placement, record: dict[str, Any]) -> None:
        t0, old = time.perf_counter(), self.placement
        # the new plan is made over the live workers: what was taken over is settled. A
        # worker found dead while it loads this plan is taken over inside _change, and stays
        # in `taken`, so the next token re-plans for the membership change
        self.taken.clear()
        self._change(placement)
        record["ms"] = round(1e3 * (time.perf_counter() - t0), 1)
        self.planner.moved(record["ms"], old, placement)
        self.planner.adopted(record, placement)
        self.log(f"re-planned at position {self.position} ({record['reason']}): groups per "
                 f"device {record['groups_per_device']}, predicted {record['predicted_ms']} "
                 f"ms/token of rounds ({record['ms']:.0f} ms to move)")

    def _head_on_workers(self) -> bool:
        head = self.opts.plan.head
        return head == "workers" or (head is None and self.opts.plan.placement == "workers")

    def _distribute(self) -> None:
        live = self.links.alive()
        self.head.deal([lk.index for lk in live] if self._head_on_workers() else [])
        for link in live:
            first, rows = self.head.spans.get(link.index, (0, 0))
            self.links.send(link, Plan(self.session, self.epoch, link.index,
                                       self.format.name, self.wire, self.history.request,
                                       self.placement.device_json(link.index), first, rows))
        if self.opts.sync.mode != "strict":  # while the workers build their shards
            # half the memory left beside its own weights (the KV cache and the rest need room)
            spare = (self.profile.memory_bytes - self.model.weight_bytes()) // 2
            self.stats.fallbacks_prepared += self.own.prepare_fallbacks(self.placement, live,
                                                                        spare)
        gone = []
        for link in live:
            reply = self.links.await_reply(link, (Ready,), PLAN_TIMEOUT_S)
            if reply is None and link.disconnected:  # died while it built: take it over
                gone.append(self.links.lost(link, "connection closed while loading its plan"))
                continue
            if reply is None:
                raise HaloError(f"worker {link.name} did not load its groups within "
                                f"{PLAN_TIMEOUT_S:.0f}s")
            assert isinstance(reply, Ready)
            if reply.error:
                raise HaloError(f"worker {link.name} cannot take its groups: {reply.error} "
                                "(give it a larger --memory-budget, or use --placement "
                                "memory|halo)")
        for dead in gone:
            self._take_over(dead.link, dead.reason)

    def idle(self) -> None:
        """Between requests (a server): keep the sessions alive (a worker drops a coordinator
        silent for its idle timeout), notice dead workers and let lost ones rejoin."""
        self.links.ping_all(lambda: Ping(self.session, time.time()))
        self._between_tokens(decoding=False)

    # -- reporting and shutdown ----------------------------------------------------------
    def sync_json(self) -> dict[str, Any]:
        self.stats.datagrams.update(self.udp.counters)
        workers = [{"address": link.name, "alive": link.alive,
                    "groups": self.placement.count(link.index), **link.info,
                    "profile": {**(link.profile.to_json() if link.profile else {}),
                                **link.estimate.to_json()},
                    "reported": link.heartbeat} for link in self.links.links]
        out = self.stats.to_json(workers)
        policy = "custom" if self.opts.custom_plan else self.opts.plan.placement
        out["placement"] = {"policy": policy, **self.placement.summary(),
                            "replans": self.planner.replans,
                            "last_kept": self.planner.last_kept}
        if self.profile.bench_speed:
            out["placement"]["coordinator"] = self.profile.to_json()
        out["predictor"] = None if self.predictor is None else {
            "path": self.predictor.path, "critical_share": self.opts.sync.critical_share,
            "grouping": self.predictor.meta.get("grouping")}
        out["wire"] = next(k for k, v in WIRE_NAMES.items() if v == self.wire)
        hub = self.rounds.hub_ms
        out["hub_ms_per_worker"] = None if hub is None else round(hub, 4)
        if self.probed is not None:
            out["probe"] = self.probed.to_json()
        return out

    def close(self) -> None:
        self.links.close(Bye(self.session))
        self.udp.close()
