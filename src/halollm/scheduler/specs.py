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
    round costs a worker its round trip plus, for a link that misses rounds, the expected
    wait for the deadline. A missed contribution is also computed again by the coordinator
    when critical (counted as if it always were): a link's effective speed is
    1 / (1/speed + miss rate/coordinator speed).

    The round trip is the live one where the link has taken part in rounds; else the
    probe's (an empty round before any plan) times how much longer live round trips turned
    out than probed ones on the links that have both (`probe_calibration`): on a loaded or
    CPU-capped device the probe, run at idle, is several times optimistic, and uncorrected
    it makes every link not yet used look faster than every link in use. The coordinator's
    latency is the fixed cost of computing any share at all (its compute benchmark's): on a
    slow or CPU-capped coordinator a small share can cost more than the workers save."""
    specs = [DeviceSpec("coordinator", coordinator.speed,
                        coordinator.memory_bytes / bytes_per_unit, latency=coordinator.call_ms,
                        hub_ms=coordinator.hub_ms, hub_round_ms=coordinator.hub_round_ms)]
    index = [0]
    calibration = probe_calibration(workers)
    for w in workers:
        if w.profile.speed <= 0:
            continue
        est = w.estimate
        speed = 1.0 / (1.0 / w.profile.speed + est.miss_rate / coordinator.speed)
        rtt = _live_rtt(w)
        if rtt is None:
            rtt = calibration * (DEFAULT_RTT_MS if est.probe_ms is None else est.probe_ms)
        specs.append(DeviceSpec(w.name, speed, w.profile.memory_bytes / bytes_per_unit,
                                loss=est.miss_rate, latency=rtt + est.miss_rate * deadline_ms,
                                load_speed=w.profile.load_speed if streaming else 0.0))
        index.append(w.index)
    return specs, index


def _live_rtt(w: WorkerState) -> float | None:
    """The live round trip without the worker's own compute, if rounds measured one."""
    if w.estimate.delay_ms is None:
        return None
    own = w.units_per_round / w.profile.speed if w.profile.speed > 0 else 0.0
    return max(0.05, w.estimate.delay_ms - own)


def probe_calibration(workers: list[WorkerState]) -> float:
    """Median of live / probed round trip over the links that have both (1 if none)."""
    ratios = sorted(live / w.estimate.probe_ms for w in workers
                    if w.estimate.probe_ms and (live := _live_rtt(w)) is not None)
    return ratios[len(ratios) // 2] if ratios else 1.0
