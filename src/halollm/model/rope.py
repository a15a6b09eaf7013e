"""Rotary position embeddings: inverse frequencies (with llama3 scaling) and cached tables."""

from __future__ import annotations

import math

import torch

from halollm.model.config import ModelConfig, RopeScaling


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if config.rope_scaling is not None:
        inv = _llama3_scale(inv, config.rope_scaling)
    elif config.rope_freq_factors is not None:
        inv = inv / torch.tensor(config.rope_freq_factors, dtype=torch.float32)
    return inv


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rope:
    """cos/sin tables (float32) for rotary position embeddings, grown on demand.

    rotate_half(x) = cat(-x2, x1) is applied as ``x[..., perm] * sign``; the sign is folded
    into the sin table, so RoPE is ``x * cos + x[..., perm] * signed_sin`` (bit-identical to
    the Hugging Face formula, in fewer operations)."""

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq = rope_inv_freq(config)
        half = config.head_dim // 2
        self.perm = torch.cat((torch.arange(half, 2 * half), torch.arange(0, half)))
        self.sign = torch.cat((-torch.ones(half), torch.ones(half)))
        self.cos = torch.empty(0)
        self.signed_sin = torch.empty(0)
        self._grow(256)

    def _grow(self, length: int) -> None:
        pos = torch.arange(length, dtype=torch.int64).float()
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos()
        self.signed_sin = emb.sin() * self.sign

    def tables(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [length >= end, head_dim], grown to cover positions < end."""
        if end > self.cos.shape[0]:
            self._grow(max(end, 2 * self.cos.shape[0]))
        return self.cos, self.signed_sin

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: float32 [heads, T, head_dim] at positions start..start+T-1."""
        end = start + x.shape[-2]
        cos, sin = self.tables(end)
        cos, sin = cos[start:end], sin[start:end]
        return torch.addcmul(x * cos, x[..., self.perm], sin)
