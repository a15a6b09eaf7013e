"""What a device measures of itself when it joins: how fast it computes and how fast it
loads groups from its model file (the scheduler's DeviceProfile starts from these)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from halollm.errors import HaloError
from halollm.loader.weights import mlp_shard, read_mlp
from halollm.model.config import ModelConfig
from halollm.model.formats import WeightFormat, Weights, resolve_format

BENCH_SECONDS = 0.4  # four CFS periods of 100 ms: a CPU quota shows in the result
LOAD_BENCH_SECONDS = 0.2


class ComputeBench(NamedTuple):
    speed: float  # MLP neurons per ms, marginal (what one more neuron in a shard costs)
    cpu_share: float  # of one core this process got while busy (a CPU quota: below 1)
    shard: Any = None  # the larger shard it timed (half of layer 0's MLP): a compute load
    call_ms: float = 0.0  # what a call costs besides its neurons (however small the shard)


@torch.inference_mode()
def compute_benchmark(config: ModelConfig, weights: Weights,
                      seconds: float = BENCH_SECONDS) -> ComputeBench:
    """How fast this device computes layer-0 MLP neurons in the session's weight format
    (packed int4 is about twice as fast per neuron as fp32 here). The speed is marginal: a
    small and a large shard are timed in turn and the difference of their median call
    times taken, so that the fixed cost of a call (which the round trip carries) does not
    make small shares look slow; that fixed cost is `call_ms`. Both are then scaled by how
    much longer the whole run took than its calls' medians add up to: a CPU quota's stalls
    (a few long ones per period, which medians leave out) or a busy machine."""
    sizes = (max(1, config.intermediate_size // 8), max(2, config.intermediate_size // 2))
    shards = [mlp_shard(weights, 0, tuple(range(n))) for n in sizes]
    x = torch.randn(1, config.hidden_size)
    for shard in shards:
        shard.forward(x)  # warm-up
    times: list[list[float]] = [[], []]
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or not all(times):
        for k, shard in enumerate(shards):
            t = time.perf_counter()
            shard.forward(x)
            times[k].append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    share = min(1.0, (time.process_time() - cpu0) / wall)
    small, big = (1e3 * statistics.median(t) for t in times)  # ms per call
    stalls = max(1.0, 1e3 * wall / (small * len(times[0]) + big * len(times[1])))
    speed = (sizes[1] - sizes[0]) / (big - small) if big > small else sizes[1] / big
    call = max(0.0, small - sizes[0] / speed)
    return ComputeBench(speed / stalls, max(share, 1e-3), shards[1], call * stalls)


def load_benchmark(config: ModelConfig, source: Any, fmt: WeightFormat | None = None,
                   seconds: float = LOAD_BENCH_SECONDS) -> float:
    """MLP neurons per millisecond whose weights this device reads from the model file
    (partial reads of scattered rows, as a calibrated group's are) and converts to the
    weight format (default: the model's default one), timed by the wall clock."""
    weights = Weights(source, fmt or resolve_format(source), partial=True)
    n = max(1, config.intermediate_size // 16)
    calls, layer = 0, 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or not calls:
        neurons = tuple(range(calls % 2, config.intermediate_size, 2))[:n]
        read_mlp(weights, layer, neurons)
        layer = (layer + 1) % config.n_layers
        calls += 1
    return n * calls / (1e3 * elapsed)


class DeviceBenchmarks:
    """A worker's measurements of itself, each taken once: compute speed per weight format
    (at the first join in that format) and loading speed (at the first join)."""

    def __init__(self, source: Any, log: Callable[[str], None]) -> None:
        self.source, self.log = source, log
        self.speeds: dict[str, float] = {}
        self.load_speed = 0.0  # MLP neurons per ms read from the model file
        self.last: float | None = None  # the speed of the last join's format (rounded)

    def speed(self, name: str) -> float:
        """MLP neurons per ms in weight format `name` ("": the model's default format); a
        HaloError for a format that does not exist."""
        try:
            fmt = WeightFormat(name) if name else resolve_format(self.source)
        except HaloError as exc:
            raise HaloError(f"unknown weight format {name!r}") from exc
        if fmt.name not in self.speeds:
            config = self.source.config
            weights = Weights(self.source, fmt, partial=True)
            self.speeds[fmt.name] = compute_benchmark(config, weights).speed
            if not self.load_speed:
                self.load_speed = load_benchmark(config, self.source)
            self.log(f"compute benchmark ({fmt.name}): {self.speeds[fmt.name]:.0f} MLP "
                     f"neurons/ms; loading {self.load_speed:.0f} neurons/ms")
        self.last = round(self.speeds[fmt.name], 1)
        return self.speeds[fmt.name]
