"""What each device can do and how its link behaves: measured, not declared.

* compute speed: a short benchmark at join (MLP neurons of this model per millisecond, run
  long enough to span several CPU-quota periods), refined from the compute time workers
  report in their heartbeats;
* memory: the budget a device declares, or a safe share of the RAM it has available;
* loading speed: a short benchmark at join (MLP neurons whose weights this device reads from
  the model file and dequantizes per millisecond): what streaming groups beyond the memory
  budget costs;
* link: moving estimates, from live traffic, of how long a contribution takes to come back
  and how often it misses its round's deadline.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAFE_MEMORY_SHARE = 0.8  # of the available RAM, without a declared budget
DEFAULT_HUB_MS = 0.05  # a full-speed core's per-worker cost per round, until one is measured


def available_memory_bytes() -> int:
    """RAM this process may still use: MemAvailable, capped by its cgroup's limit."""
    avail = None
    try:
        text = Path("/proc/meminfo").read_text()
        m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
        if m:
            avail = int(m.group(1)) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            avail = min(avail, int(raw))
    return avail


def memory_budget(declared: int | None) -> int:
    """The declared budget, or a safe share of the available RAM."""
    return declared if declared is not None else int(SAFE_MEMORY_SHARE *
                                                     available_memory_bytes())


class LinkEstimate:
    """Moving estimates for one worker's link, from live rounds: the share of contributions
    missing at the deadline, and the time from sending the activation to the contribution's
    arrival (both exponentially weighted; `alpha` = weight of the newest round)."""

    def __init__(self, alpha: float = 0.02) -> None:
        self.alpha = alpha
        self.miss_rate = 0.0
        self.delay_ms: float | None = None
        self.probe_ms: float | None = None  # round trip of an empty round, before any plan
        self.rounds = 0
        self.missed = 0

    def observe(self, arrived: bool, delay_ms: float | None = None) -> None:
        self.rounds += 1
        a = max(self.alpha, 1.0 / self.rounds)  # a plain mean until the window fills
        self.miss_rate += a * ((0.0 if arrived else 1.0) - self.miss_rate)
        if not arrived:
            self.missed += 1
        if delay_ms is not None:
            self.delay_ms = delay_ms if self.delay_ms is None else \
                self.delay_ms + self.alpha * 5 * (delay_ms - self.delay_ms)

    def to_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "missed": self.missed,
                "miss_rate": round(self.miss_rate, 4),
                "delay_ms": None if self.delay_ms is None else round(self.delay_ms, 3),
                "probe_ms": None if self.probe_ms is None else round(self.probe_ms, 3)}


@dataclass
class DeviceProfile:
    """One device as the scheduler sees it."""

    name: str
    bench_speed: float  # neurons per ms at join
    memory_bytes: int
    live_speed: float | None = None  # from reported compute time, if any
    load_speed: float = 0.0  # neurons per ms it can stream in beyond memory (0: it cannot)
    hub_ms: float = DEFAULT_HUB_MS  # the coordinator's: its own ms per worker in a round
    hub_round_ms: float = 0.0  # ... and per round with any worker, besides (probed)
    call_ms: float = 0.0  # the coordinator's: a round in which it computes any share costs
    # it this besides the share's neurons (measured by its compute benchmark)

    @property
    def speed(self) -> float:
        """The lower of the two: live timings catch contention the benchmark missed, but
        they time single bursts, which a CPU quota lets run at full speed (the throttling
        shows between bursts, as delay), so they may not raise the benchmark's figure."""
        if self.live_speed and self.bench_speed:
            return min(self.live_speed, self.bench_speed)
        return self.live_speed or self.bench_speed

    def observe_compute(self, units: float, ms: float) -> None:
        """Units computed in `ms` of the device's own compute time since the last report."""
        if units <= 0 or ms <= 0:
            return
        s = units / ms
        self.live_speed = s if self.live_speed is None else self.live_speed + 0.3 * (
            s - self.live_speed)

    def to_json(self) -> dict[str, Any]:
        return {"speed_neurons_per_ms": round(self.speed, 1),
                "bench_speed_neurons_per_ms": round(self.bench_speed, 1),
                "memory_bytes": self.memory_bytes,
                "load_neurons_per_ms": round(self.load_speed, 1)}
