"""Prometheus metrics of `halo serve`."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from halollm.generate import GenerationResult
from halollm.serve.engine import Engine

_SYNC = {"lost": "contributions lost", "received": "contributions received",
         "late": "contributions late", "critical_waits":
         "rounds with a critical contribution missing at the deadline",
         "fallbacks": "critical contributions computed by the coordinator",
         "repairs_served": "KV positions repaired", "rounds": "sync rounds"}
# the route label takes only these values (anything else is "other"), so requests to made-up
# paths cannot grow the metrics without bound
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                    "/metrics"})


def snapshot(stats: Callable[[], dict]) -> dict:
    """The cluster's statistics, read from the HTTP thread while the engine thread may be
    updating them: retried if a dictionary changed under the read."""
    for _ in range(5):
        try:
            return stats()
        except RuntimeError:
            continue
    return {}


class Metrics:
    def __init__(self, engine: Engine, cluster_stats: Callable[[], dict] | None) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("halo_requests", "Requests by route and status",
                                ["route", "status"], registry=r)
        self.tokens = Counter("halo_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("halo_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.token_latency = Histogram(
            "halo_token_latency_seconds", "Per-token decode latency", registry=r,
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.tokens_per_s = Gauge("halo_tokens_per_second",
                                  "Decode speed of the last request", registry=r)
        gauges: dict[str, tuple[str, Callable[[], float]]] = {
            "halo_queue_waiting": ("Requests waiting for the model", lambda: engine.waiting),
            "halo_queue_limit": ("Most requests that may wait (--max-queue)",
                                 lambda: engine.max_queue),
            "halo_busy": ("1 while a request is generating", lambda: 1 if engine.busy else 0),
            "halo_requests_cancelled": ("Requests cancelled by a disconnect",
                                        lambda: engine.cancelled),
            "halo_model_steps": ("Model steps run (prefill and decode), cancelled requests "
                                 "included", lambda: engine.steps)}
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)
        if cluster_stats is not None:
            for key, doc in _SYNC.items():
                g = Gauge(f"halo_sync_{key}", doc.capitalize(), registry=r)
                g.set_function(lambda k=key: snapshot(cluster_stats).get(k, 0))
            alive = Gauge("halo_worker_alive", "1 if the worker is alive", ["worker"],
                          registry=r)
            self._alive, self._cluster = alive, cluster_stats

    def count(self, route: str, status: int) -> None:
        self.requests.labels(route if route in ROUTES else "other", str(status)).inc()

    def observe(self, result: GenerationResult, seconds: float) -> None:
        self.tokens.inc(len(result.token_ids))
        self.prompt_tokens.inc(result.prompt_tokens)
        for s in result.step_s:
            self.token_latency.observe(s)
        if result.step_s:
            self.tokens_per_s.set(len(result.step_s) / sum(result.step_s))

    def render(self) -> bytes:
        if hasattr(self, "_cluster"):
            for w in snapshot(self._cluster).get("workers", []):
                self._alive.labels(worker=w["address"]).set(1 if w["alive"] else 0)
        return generate_latest(self.registry)
