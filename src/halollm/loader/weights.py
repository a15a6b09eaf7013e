"""One group's weights, read from the model file: only its rows and column blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from halollm.model.config import ModelConfig
from halollm.model.llama import AttentionShard, MlpShard, Rope, rows_of_heads


@dataclass
class GroupWeights:
    """The compute-dtype tensors of one group, and what reading them cost."""

    tensors: tuple[torch.Tensor | None, ...]
    file_bytes: int  # bytes of the model file read (quantized)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors if t is not None)


def group_nbytes(config: ModelConfig, kind: str, units: int, dtype: torch.dtype) -> int:
    """Dequantized size in the compute dtype of a group of `units` MLP neurons or KV heads
    (what counts against a memory budget)."""
    d, size = config.hidden_size, torch.finfo(dtype).bits // 8
    if kind == "mlp":
        return 3 * units * d * size
    q, kv = units * config.q_per_kv * config.head_dim, units * config.head_dim
    bias = (q + 2 * kv) * size if config.attn_bias else 0
    return ((q + 2 * kv) * d + d * q) * size + bias


def read_group(source: Any, config: ModelConfig, layer: int, kind: str,
               units: tuple[int, ...], dtype: torch.dtype) -> GroupWeights:
    """The weights of MLP neurons or KV heads `units` of one layer half."""
    if kind == "mlp":
        return read_mlp(source, layer, units, dtype)
    return read_attention(source, config, layer, units, dtype)


def read_mlp(source: Any, layer: int, neurons: tuple[int, ...], dtype: torch.dtype
             ) -> GroupWeights:
    """(gate and up rows stacked [2n, d], down columns [d, n])."""
    idx = np.asarray(neurons)
    p = f"layers.{layer}."
    gate, b1 = source.rows(p + "w_gate", idx)
    up, b2 = source.rows(p + "w_up", idx)
    down, b3 = source.cols(p + "w_down", idx)
    gate_up = torch.from_numpy(np.concatenate([gate, up])).to(dtype).contiguous()
    return GroupWeights((gate_up, torch.from_numpy(down).to(dtype).contiguous()),
                        b1 + b2 + b3)


def read_attention(source: Any, config: ModelConfig, layer: int, kv_heads: tuple[int, ...],
                   dtype: torch.dtype) -> GroupWeights:
    """(q, k, v rows stacked [.., d], their biases or None, o columns [d, n_q * hd])."""
    g, hd = config.q_per_kv, config.head_dim
    q_rows = rows_of_heads([k * g + j for k in kv_heads for j in range(g)], hd).numpy()
    kv_rows = rows_of_heads(kv_heads, hd).numpy()
    p = f"layers.{layer}."
    q, b1 = source.rows(p + "wq", q_rows)
    k, b2 = source.rows(p + "wk", kv_rows)
    v, b3 = source.rows(p + "wv", kv_rows)
    o, b4 = source.cols(p + "wo", q_rows)
    bias = None
    if config.attn_bias:
        bias = torch.from_numpy(np.concatenate([source.tensor(p + "bq")[q_rows],
                                                source.tensor(p + "bk")[kv_rows],
                                                source.tensor(p + "bv")[kv_rows]])).to(dtype)
    qkv = torch.from_numpy(np.concatenate([q, k, v])).to(dtype).contiguous()
    return GroupWeights((qkv, bias, torch.from_numpy(o).to(dtype).contiguous()),
                        b1 + b2 + b3 + b4)


def mlp_shard(source: Any, layer: int, neurons: tuple[int, ...], dtype: torch.dtype
              ) -> MlpShard:
    """A resident MLP shard built from its own rows and columns only (not whole tensors)."""
    return MlpShard.of(neurons, *read_mlp(source, layer, neurons, dtype).tensors)


def attention_shard(source: Any, config: ModelConfig, layer: int, kv_heads: tuple[int, ...],
                    dtype: torch.dtype, rope: Rope) -> AttentionShard:
    """A resident attention shard built from its own rows and columns only."""
    shard = AttentionShard.without_weights(config, kv_heads, rope)
    shard.w_qkv, shard.b_qkv, shard.w_o = read_attention(  # type: ignore[assignment]
        source, config, layer, kv_heads, dtype).tensors
    return shard
