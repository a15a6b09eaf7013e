"""What the web page's live view shows, as one JSON object (`GET /status`, and every half
second on the `GET /status/events` stream): the engine (busy, queue, per-step latency,
tokens/s), each device (groups, measured speed and memory, its link's miss rate and round
trip, alive / dead / taken over) and the cluster's events (re-plans, takeovers, rejoins) with
the time this server first saw them.

Read-only: it reads the engine's counters, the per-step latencies the engine reports
(`Engine.on_step`) and the coordinator's own report (`Coordinator.sync_json`), and changes
nothing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from halollm.generate import GenerationResult
from halollm.serve.engine import Engine
from halollm.serve.metrics import snapshot

HISTORY = 240  # model steps kept for the latency chart
EVENTS = 50  # cluster events kept
SPEED_WINDOW = 16  # decode steps averaged for the live tokens/s
CACHE_S = 0.2  # one report serves every viewer asking within this time


class Status:
    def __init__(self, engine: Engine, model_id: str,
                 cluster_stats: Callable[[], dict] | None,
                 device: Callable[[], dict] | None = None) -> None:
        self.engine, self.model_id = engine, model_id
        self.cluster_stats, self.device = cluster_stats, device
        self.started = time.time()
        self.steps: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.n_steps = 0
        self.last_request: dict[str, Any] | None = None
        self._first_seen: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    # -- fed by the engine thread --------------------------------------------------------
    def on_step(self, ms: float, tokens: int, request: int) -> None:
        with self._lock:
            self.steps.append({"step": self.n_steps, "ms": round(ms, 2), "tokens": tokens,
                               "request": request, "t": time.time()})
            self.n_steps += 1

    def on_result(self, result: GenerationResult, seconds: float) -> None:
        tps = len(result.step_s) / sum(result.step_s) if result.step_s else None
        self.last_request = {"tokens": len(result.token_ids),
                             "prompt_tokens": result.prompt_tokens,
                             "tokens_per_s": None if tps is None else round(tps, 2),
                             "decode_ms_per_token": round(result.decode_ms_per_token, 2),
                             "seconds": round(seconds, 2),
                             "finish_reason": result.finish_reason}

    # -- read by the HTTP side -----------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < CACHE_S:
            return self._cached[1]
        out = self._build()
        self._cached = (now, out)
        return out

    def _build(self) -> dict[str, Any]:
        e = self.engine
        with self._lock:
            steps = list(self.steps)
        sync = snapshot(self.cluster_stats) if self.cluster_stats is not None else None
        decode = [s for s in steps if s["tokens"] == 1]
        recent = decode[-SPEED_WINDOW:]
        live = 1e3 * len(recent) / sum(s["ms"] for s in recent) if recent else None
        out: dict[str, Any] = {
            "model": self.model_id, "time": round(time.time(), 3),
            "uptime_s": round(time.time() - self.started, 1),
            "engine": {"busy": e.busy, "queue": e.waiting, "max_queue": e.max_queue,
                       "requests": e.finished, "cancelled": e.cancelled, "steps": e.steps},
            "speed": {"tokens_per_s": None if live is None else round(live, 2),
                      "last_request": self.last_request},
            "latency": self._latency(steps, sync),
            "cluster": None, "events": [],
            "devices": [self._coordinator(sync)]}
        if sync:
            out["cluster"] = _totals(sync)
            out["devices"] += [_worker(i + 1, w, sync) for i, w in
                               enumerate(sync.get("workers", []))]
            out["events"] = self._events(sync)
        return out

    def _latency(self, steps: list[dict[str, Any]], sync: dict | None) -> list[dict[str, Any]]:
        """Per model step: its latency, and (a cluster) the time spent waiting for workers
        after the coordinator's own compute. The coordinator reports one per_token entry
        per model step, in the same order, so the last ones line up with the last steps."""
        per_token = (sync or {}).get("per_token") or []
        offset = len(per_token) - self.n_steps
        out = []
        for s in steps:
            row = {k: s[k] for k in ("step", "ms", "tokens", "request")}
            k = s["step"] + offset
            if 0 <= k < len(per_token):
                row["waited_ms"] = per_token[k].get("waited_ms")
            out.append(row)
        return out

    def _coordinator(self, sync: dict | None) -> dict[str, Any]:
        prof = self.device() if self.device is not None else {}
        groups = None
        if sync:
            per_device = sync.get("placement", {}).get("groups_per_device") or []
            groups = per_device[0] if per_device else None
        return {"index": 0, "name": "coordinator" if sync is not None else "this device",
                "role": "coordinator" if sync is not None else "single", "state": "alive",
                "groups": groups, "speed": prof.get("speed_neurons_per_ms") or None,
                "memory_bytes": prof.get("memory_bytes")}

    def _events(self, sync: dict) -> list[dict[str, Any]]:
        """Takeovers, rejoins and re-plans, oldest first, each stamped with the wall time
        this server first saw it."""
        found = []
        placement = sync.get("placement", {})
        for kind, records in (("replan", placement.get("replans", [])),
                              ("takeover", sync.get("takeovers", [])),
                              ("rejoin", sync.get("rejoins", []))):
            for i, rec in enumerate(records):
                t = self._first_seen.setdefault((kind, i), time.time())
                found.append({"kind": kind, "t": round(t, 3),
                              "position": rec.get("position"), "text": _event_text(kind, rec)})
        found.sort(key=lambda ev: ev["t"])
        return found[-EVENTS:]


def _event_text(kind: str, rec: dict[str, Any]) -> str:
    if kind == "takeover":
        return (f"worker {rec.get('worker')} lost ({rec.get('reason')}) at token "
                f"{rec.get('position')}: the coordinator took over its {rec.get('groups')} "
                f"groups in {rec.get('ms')} ms")
    if kind == "rejoin":
        return f"worker {rec.get('worker')} rejoined at token {rec.get('position')}"
    groups = rec.get("groups_per_device")
    if rec.get("reason") == "initial":
        return f"initial plan: groups per device {groups}"
    return (f"re-planned at token {rec.get('position')} ({rec.get('reason')}): groups per "
            f"device {groups}")


def _worker(index: int, w: dict[str, Any], sync: dict[str, Any]) -> dict[str, Any]:
    prof = w.get("profile") or {}
    taken = any(t.get("worker") == w.get("address") for t in sync.get("takeovers", []))
    state = "alive" if w.get("alive") else ("taken over" if taken else "dead")
    reported = w.get("reported") or {}
    return {"index": index, "name": w.get("address"), "role": "worker", "state": state,
            "groups": w.get("groups"), "speed": prof.get("speed_neurons_per_ms"),
            "memory_bytes": prof.get("memory_bytes"),
            "link": {"miss_rate": prof.get("miss_rate"), "round_trip_ms": prof.get("delay_ms"),
                     "rounds": prof.get("rounds"), "missed": prof.get("missed")},
            "repairs": reported.get("repaired_positions"),
            "rounds_served": reported.get("rounds")}


def _totals(sync: dict[str, Any]) -> dict[str, Any]:
    keys = ("mode", "wire", "rounds", "expected", "received", "late", "lost", "loss_rate",
            "critical_waits", "fallbacks", "recomputed", "repairs_served", "deadline_ms",
            "waited_ms_per_token")
    out = {k: sync.get(k) for k in keys}
    out["policy"] = sync.get("placement", {}).get("policy")
    out["takeovers"] = len(sync.get("takeovers", []))
    out["rejoins"] = len(sync.get("rejoins", []))
    out["replans"] = max(0, len(sync.get("placement", {}).get("replans", [])) - 1)
    return out
