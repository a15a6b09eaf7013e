"""One group's weights, read from the model file: only its rows and column blocks, in the
device's weight format (packed groups are stored and moved as their packed bytes, never as
dequantized copies)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halollm.model.config import ModelConfig
from halollm.model.formats import Matrix, Weights, nbytes
from halollm.model.llama import AttentionShard, MlpShard, Rope, attention_weights, mlp_weights


@dataclass
class GroupWeights:
    """The matrices of one group (float tensors or packed), and what reading them cost."""

    tensors: tuple[Matrix | None, ...]
    file_bytes: int  # bytes of the model file read (quantized)

    @property
    def nbytes(self) -> int:
        return sum(nbytes(t) for t in self.tensors)


def group_nbytes(config: ModelConfig, kind: str, units: int, weights: Weights | torch.dtype
                 ) -> int:
    """Resident size of a group of `units` MLP neurons or KV heads in the device's format
    (what counts against a memory budget): packed bytes for packed weights (an estimate from
    each matrix's layout), else the compute dtype's."""
    if isinstance(weights, Weights):
        return units * weights.unit_bytes(kind, config)
    d, size = config.hidden_size, torch.finfo(weights).bits // 8
    if kind == "mlp":
        return 3 * units * d * size
    q, kv = units * config.q_per_kv * config.head_dim, units * config.head_dim
    bias = (q + 2 * kv) * size if config.attn_bias else 0
    return ((q + 2 * kv) * d + d * q) * size + bias


def read_group(weights: Weights, config: ModelConfig, layer: int, kind: str,
               units: tuple[int, ...]) -> GroupWeights:
    """The weights of MLP neurons or KV heads `units` of one layer half."""
    if kind == "mlp":
        return read_mlp(weights, layer, units)
    return read_attention(weights, config, layer, units)


def read_mlp(weights: Weights, layer: int, neurons: tuple[int, ...]) -> GroupWeights:
    """(gate and up rows stacked [2n, d], down columns [d, n])."""
    mats, read = mlp_weights(weights, layer, neurons)
    return GroupWeights(mats, read)


def read_attention(weights: Weights, config: ModelConfig, layer: int,
                   kv_heads: tuple[int, ...]) -> GroupWeights:
    """(q, k, v rows stacked [.., d], their biases or None, o columns [d, n_q * hd])."""
    mats, read = attention_weights(weights, config, layer, kv_heads)
    return GroupWeights(mats, read)


def mlp_shard(weights: Weights, layer: int, neurons: tuple[int, ...]) -> MlpShard:
    """A resident MLP shard built from its own rows and columns only (not whole tensors)."""
    return MlpShard.of(neurons, *read_mlp(weights, layer, neurons).tensors)  # type: ignore[arg-type]


def attention_shard(weights: Weights, config: ModelConfig, layer: int,
                    kv_heads: tuple[int, ...], rope: Rope) -> AttentionShard:
    """A resident attention shard built from its own rows and columns only."""
    shard = AttentionShard.without_weights(config, kv_heads, rope)
    return shard.with_weights(read_attention(weights, config, layer, kv_heads).tensors)
