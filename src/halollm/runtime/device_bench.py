"""What a device measures of itself when it joins: how fast it computes and how fast it
loads groups from its model file (the scheduler's DeviceProfile starts from these)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from halollm.loader.weights import read_mlp
from halollm.model.config import ModelConfig
from halollm.model.formats import WeightFormat, Weights, resolve_format
from halollm.model.llama import MlpShard

BENCH_SECONDS = 0.4  # four CFS periods of 100 ms: a CPU quota shows in the result
LOAD_BENCH_SECONDS = 0.2


@torch.inference_mode()
def compute_benchmark(config: ModelConfig, tensor: Callable[[str], torch.Tensor],
                      seconds: float = BENCH_SECONDS) -> float:
    """MLP neurons of layer 0 this device computes per millisecond (fp32, one token), timed
    by the wall clock so that a CPU quota or a busy machine lowers it."""
    n = max(1, config.intermediate_size // 8)
    shard = MlpShard(config, 0, range(n), tensor, torch.float32)
    x = torch.randn(1, config.hidden_size)
    shard.forward(x)  # warm-up
    calls = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        shard.forward(x)
        calls += 1
    return n * calls / (1e3 * elapsed)


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
