"""Synchronisation statistics of a distributed generation (what `--json` reports as `sync`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SyncStats:
    mode: str
    rounds: int = 0
    expected: int = 0  # worker contributions the plan asked for
    received: int = 0  # arrived before the round closed
    late: int = 0  # arrived after the round closed (discarded)
    lost: int = 0  # never arrived before the round closed (late ones included)
    critical_waits: int = 0  # rounds with a critical contribution missing at the deadline
    recomputed: int = 0  # contributions the coordinator computed itself after a takeover
    waited_ms: float = 0.0  # time spent waiting for workers after the own compute finished
    repairs_served: int = 0  # KV positions sent to workers that missed them
    predictions: int = 0  # rounds where the predictor ran (something missing at the deadline)
    retries: int = 0  # activations re-sent for a critical attention contribution missing
    fallbacks: int = 0  # critical MLP contributions missing at the deadline, computed locally
    fallback_builds: int = 0  # ... of which needed their shard built then (not prepared)
    fallbacks_prepared: int = 0  # fallback shards built with the plan, ahead of need
    predict_ms: float = 0.0  # time spent predicting significance (relaxed mode, predictor)
    # where a round's time goes on the coordinator (issue 16), summed over rounds
    stage_ms: Counter[str] = field(default_factory=Counter)
    # the coordinator's CPU for decode rounds with workers, all but its own share (sending,
    # receiving, opening, deciding, summing; fallbacks too): what the probe predicts
    hub_cpu_ms: float = 0.0
    hub_rounds: int = 0
    hub_workers: int = 0  # workers in those rounds, summed
    hub_wakeups: int = 0  # times arriving datagrams woke the coordinator in those rounds
    head_rounds: int = 0  # LM head rounds (its rows split over the workers)
    head_ms: float = 0.0  # ... their wall time, sending to summing
    head_recomputed: int = 0  # ... workers' rows missing at the deadline, computed here
    takeovers: list[dict[str, Any]] = field(default_factory=list)
    rejoins: list[dict[str, Any]] = field(default_factory=list)
    per_token: list[dict[str, Any]] = field(default_factory=list)
    datagrams: Counter[str] = field(default_factory=Counter)
    deadline_ms: float | None = None

    def token_done(self, pos: int, before: tuple[int, int, float]) -> None:
        exp, rec, wait = before
        self.per_token.append({"pos": pos, "expected": self.expected - exp,
                               "received": self.received - rec,
                               "waited_ms": round(self.waited_ms - wait, 3)})

    def mark(self) -> tuple[int, int, float]:
        return self.expected, self.received, self.waited_ms

    def to_json(self, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        n = max(1, len(self.per_token))
        return {
            "mode": self.mode,
            "rounds": self.rounds,
            "expected": self.expected,
            "received": self.received,
            "late": self.late,
            "lost": self.lost,
            "loss_rate": round(self.lost / self.expected, 5) if self.expected else 0.0,
            "critical_waits": self.critical_waits,
            "recomputed": self.recomputed,
            "waited_ms": round(self.waited_ms, 2),
            "waited_ms_per_token": round(self.waited_ms / n, 3),
            "deadline_ms": None if self.deadline_ms is None else round(self.deadline_ms, 3),
            "repairs_served": self.repairs_served,
            "predictions": self.predictions,
            "retries": self.retries,
            "fallbacks": self.fallbacks,
            "fallback_builds": self.fallback_builds,
            "fallbacks_prepared": self.fallbacks_prepared,
            "predict_ms": round(self.predict_ms, 2),
            "predict_ms_per_token": round(self.predict_ms / n, 3),
            "stage_ms_per_round": {k: round(v / max(1, self.rounds), 4)
                                   for k, v in sorted(self.stage_ms.items())},
            "hub_cpu": {"ms_per_round": round(self.hub_cpu_ms / max(1, self.hub_rounds), 4),
                        "workers_per_round": round(self.hub_workers / max(1, self.hub_rounds),
                                                   2), "rounds": self.hub_rounds,
                        "wakeups_per_round": round(self.hub_wakeups / max(1, self.hub_rounds),
                                                   2)},
            "head": {"rounds": self.head_rounds, "recomputed": self.head_recomputed,
                     "ms_per_round": round(self.head_ms / max(1, self.head_rounds), 4)},
            "takeovers": self.takeovers,
            "rejoins": self.rejoins,
            "datagrams": dict(self.datagrams),
            "workers": workers or [],
            "per_token": self.per_token,
        }
