"""The devices as the scheduler sees them, from what was measured (a pure function)."""

from __future__ import annotations

from dataclasses import dataclass

from halollm.scheduler.placement import Placement
from halollm.scheduler.profile import DeviceProfile, LinkEstimate
from halollm.scheduler.solver import DeviceSpec

DEFAULT_RTT_MS = 0.5  # a LAN round trip with Python at both ends, until one is measured


def units_per_round(placement: Placement | None, device: int, n_layers: int) -> float:
    """Mean MLP neurons the device computes per round it takes part in (placement now)."""
    if placement is None:
        return 0.0
    used = [n for i in range(n_layers) if (n := len(placement.units_of(device, i, "mlp")))]
    return sum(used) / len(used) if used else 0.0


@dataclass(frozen=True)
class WorkerState:
    index: int  # the runtime's device number
    name: str
    profile: DeviceProfile
    estimate: LinkEstimate
    units_per_round: float  # mean MLP neurons it computes per round it takes part in now


def device_specs(coordinator: DeviceProfile, workers: list[WorkerState], deadline_ms: float,
                 bytes_per_unit: float, streaming: bool) -> tuple[list[DeviceSpec], list[int]]:
    """(specs, device numbers): the coordinator first (with what each worker in a round
    costs it), then every worker with a measured speed. Besides compute, taking part in a
    round costs a worker its round trip (live; a LAN guess before any round) plus, for a
    link that misses rounds, the expected wait for the deadline. A missed contribution is
    also computed again by the coordinator when critical (counted as if it always were): a
    link's effective speed is 1 / (1/speed + miss rate/coordinator speed)."""
    specs = [DeviceSpec("coordinator", coordinator.speed,
                        coordinator.memory_bytes / bytes_per_unit, hub_ms=coordinator.hub_ms)]
    index = [0]
    for w in workers:
        if w.profile.speed <= 0:
            continue
        est = w.estimate
        own = w.units_per_round / w.profile.speed
        rtt = DEFAULT_RTT_MS if est.delay_ms is None else max(0.05, est.delay_ms - own)
        speed = 1.0 / (1.0 / w.profile.speed + est.miss_rate / coordinator.speed)
        specs.append(DeviceSpec(w.name, speed, w.profile.memory_bytes / bytes_per_unit,
                                loss=est.miss_rate, latency=rtt + est.miss_rate * deadline_ms,
                                load_speed=w.profile.load_speed if streaming else 0.0))
        index.append(w.index)
    return specs, index
