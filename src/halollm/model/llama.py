"""LLaMA-family decoder math, written per neuron group.

A *shard* computes the partial residual update of a set of units of one layer half:
``AttentionShard`` for a set of KV heads (and their query heads), ``MlpShard`` for a set of
intermediate neurons. A layer's update is the sum of its shards' updates; the unsplit model is
the case of one shard per half holding every unit. Nothing here knows about devices or networks:
the runtime decides which shards live where and sums what arrives.

Numerics: the residual stream ``h`` is kept in float32 whatever the compute dtype; weights,
normalised activations and shard outputs use the compute dtype. RMSNorm and RoPE follow
Hugging Face's LLaMA (norm in float32, RoPE tables in float32 cast to the compute dtype).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from halollm.model.config import ModelConfig, RopeScaling

TensorSource = Callable[[str], np.ndarray]  # canonical name -> float32 array
Half = Literal["attn", "mlp"]


def cached(tensor: TensorSource, size: int = 8) -> TensorSource:
    """`tensor` with the last `size` tensors kept: building many shards of one layer then
    dequantizes each of its matrices once, not once per shard."""
    memo: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in memo:
            if len(memo) >= size:
                memo.pop(next(iter(memo)))
            memo[name] = tensor(name)
        return memo[name]

    return get


REFINE_TOP = 16  # logits recomputed in float32 per position when computing in fp16/bf16


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

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: float32 [heads, T, head_dim] at positions start..start+T-1."""
        end = start + x.shape[-2]
        if end > self.cos.shape[0]:
            self._grow(max(end, 2 * self.cos.shape[0]))
        cos, sin = self.cos[start:end], self.signed_sin[start:end]
        return torch.addcmul(x * cos, x[..., self.perm], sin)


def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b). One-token products run in the weights' dtype (bandwidth-bound GEMV);
    multi-token fp16 products run in float32, because PyTorch's CPU fp16 GEMM has no fast
    kernel without AVX512-FP16 (measured 5x slower than upcasting)."""
    if x.shape[0] > 1 and w.dtype == torch.float16:
        return F.linear(x.float(), w.float(), None if b is None else b.float())
    return F.linear(x.to(w.dtype), w, b)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
             ) -> torch.Tensor:
    """RMSNorm of the float32 residual stream, returned in the compute dtype.
    (Written out: faster than torch's fused CPU kernel for one row, and the exact HF formula.)"""
    return (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(dtype)


class KVCache:
    """Keys and values (float32) of one attention shard, indexed by absolute position."""

    def __init__(self, n_kv: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 capacity: int = 256) -> None:
        self.k = torch.zeros(n_kv, capacity, head_dim, dtype=dtype)
        self.v = torch.zeros(n_kv, capacity, head_dim, dtype=dtype)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[1]
        if end > self.k.shape[1]:
            cap = max(end, 2 * self.k.shape[1])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.zeros(old.shape[0], cap, old.shape[2], dtype=old.dtype)
                new[:, : old.shape[1]] = old
                setattr(self, name, new)
        self.k[:, start:end] = k
        self.v[:, start:end] = v


def rows_of_heads(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)],
                        dtype=torch.long)


class AttentionShard:
    """Attention of a set of KV heads (and their query heads) of one layer."""

    def __init__(self, config: ModelConfig, layer: int, kv_heads: Sequence[int],
                 tensor: TensorSource, dtype: torch.dtype, rope: Rope) -> None:
        self.kv_heads = tuple(kv_heads)
        g, hd = config.q_per_kv, config.head_dim
        q_heads = [k * g + j for k in self.kv_heads for j in range(g)]
        self.n_q, self.n_kv, self.head_dim = len(q_heads), len(self.kv_heads), hd
        q_rows, kv_rows = rows_of_heads(q_heads, hd), rows_of_heads(self.kv_heads, hd)
        p = f"layers.{layer}."

        def t(name: str) -> torch.Tensor:
            return torch.from_numpy(tensor(p + name))

        self.w_qkv: torch.Tensor | None = torch.cat(
            [t("wq")[q_rows], t("wk")[kv_rows], t("wv")[kv_rows]]).to(dtype).contiguous()
        self.b_qkv: torch.Tensor | None = None
        if config.attn_bias:
            self.b_qkv = torch.cat([t("bq")[q_rows], t("bk")[kv_rows], t("bv")[kv_rows]]
                                   ).to(dtype)
        self.w_o: torch.Tensor | None = t("wo")[:, q_rows].to(dtype).contiguous()
        self.rope = rope
        self.cache = KVCache(self.n_kv, hd)

    @classmethod
    def without_weights(cls, config: ModelConfig, kv_heads: Sequence[int], rope: Rope
                        ) -> AttentionShard:
        """A shard holding only its KV cache: it computes through `with_weights` (weights
        streamed from a group store, read for one use)."""
        shard = cls.__new__(cls)
        shard.kv_heads = tuple(kv_heads)
        shard.n_kv, shard.n_q = len(shard.kv_heads), len(shard.kv_heads) * config.q_per_kv
        shard.head_dim, shard.rope = config.head_dim, rope
        shard.w_qkv = shard.b_qkv = shard.w_o = None
        shard.cache = KVCache(shard.n_kv, config.head_dim)
        return shard

    @property
    def streamed(self) -> bool:
        """True for a shard made without weights (they come with each use)."""
        return self.w_qkv is None

    def with_weights(self, weights: Sequence[torch.Tensor | None]) -> AttentionShard:
        """This shard (its KV cache shared) computing with weights (w_qkv, b_qkv or None,
        w_o) read for this use only (a group store's `GroupWeights.tensors`)."""
        shard = copy.copy(self)
        shard.w_qkv, shard.b_qkv, shard.w_o = weights
        return shard

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        if self.w_qkv is None or self.w_o is None:
            raise RuntimeError("a shard made without weights computes through with_weights()")
        return self.w_qkv, self.b_qkv, self.w_o

    def _qkv(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
        """q [n_q, T, hd], k and v [n_kv, T, hd] (float32, RoPE applied) for x [T, d]."""
        T, hd = x.shape[0], self.head_dim
        w_qkv, b_qkv, _ = self._weights()
        qkv = project(x, w_qkv, b_qkv).float()
        n_qk = self.n_q + self.n_kv
        qk = self.rope.apply(qkv[:, : n_qk * hd].view(T, n_qk, hd).transpose(0, 1), start)
        v = qkv[:, n_qk * hd:].view(T, self.n_kv, hd).transpose(0, 1)
        return qk[: self.n_q], qk[self.n_q:], v

    def fill_cache(self, x: torch.Tensor, start: int) -> None:
        """Write keys and values for inputs x [T, d] at positions start.. without attending
        (KV repair and replay: K and V depend only on the layer input at that position)."""
        _, k, v = self._qkv(x, start)
        self.cache.write(start, k, v)

    def forward(self, x: torch.Tensor, start: int,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: normalised input [T, d] at positions start..start+T-1 -> partial update [T, d].
        Projections run in the compute dtype; RoPE, the KV cache and attention in float32
        (CPU attention kernels are several times faster in float32 than in fp16/bf16).
        key_mask [start+T] (bool), if given, excludes cached positions known to be missing."""
        T, hd = x.shape[0], self.head_dim
        q, k, v = self._qkv(x, start)
        self.cache.write(start, k, v)
        end = start + T
        mask = None
        if key_mask is not None:
            mask = torch.ones(T, end, dtype=torch.bool).tril(diagonal=start) & key_mask[:end]
        elif T > 1 and start > 0:
            mask = torch.ones(T, end, dtype=torch.bool).tril(diagonal=start)
        out = F.scaled_dot_product_attention(
            q[None], self.cache.k[None, :, :end], self.cache.v[None, :, :end], attn_mask=mask,
            is_causal=mask is None and T > 1, enable_gqa=self.n_q != self.n_kv)
        return project(out[0].transpose(0, 1).reshape(T, self.n_q * hd), self._weights()[2])


class MlpShard:
    """SwiGLU MLP of a set of intermediate neurons of one layer."""

    def __init__(self, config: ModelConfig, layer: int, neurons: Sequence[int],
                 tensor: TensorSource, dtype: torch.dtype) -> None:
        self.neurons = tuple(neurons)
        idx = torch.tensor(self.neurons, dtype=torch.long)
        p = f"layers.{layer}."
        gate = torch.from_numpy(tensor(p + "w_gate"))[idx]
        up = torch.from_numpy(tensor(p + "w_up"))[idx]
        self.w_gate_up = torch.cat([gate, up]).to(dtype).contiguous()
        self.w_down = torch.from_numpy(tensor(p + "w_down"))[:, idx].to(dtype).contiguous()
        self.n = len(self.neurons)

    @classmethod
    def of(cls, neurons: Sequence[int], w_gate_up: torch.Tensor, w_down: torch.Tensor
           ) -> MlpShard:
        """A shard over weights already read ([2n, d] gate rows then up rows; [d, n])."""
        shard = cls.__new__(cls)
        shard.neurons, shard.n = tuple(neurons), len(neurons)
        shard.w_gate_up, shard.w_down = w_gate_up, w_down
        return shard

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for each neuron: [T, n]."""
        gu = project(x, self.w_gate_up)
        return F.silu(gu[:, : self.n]) * gu[:, self.n:]

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return project(self.activations(x), self.w_down)


def sum_partials(partials: Sequence[torch.Tensor]) -> torch.Tensor:
    """The residual update of a layer half: the float32 sum of its shards' partial updates,
    added to the residual stream once (as the coordinator does with what arrives)."""
    total = partials[0].float()
    for p in partials[1:]:
        total = total + p.float()
    return total


class Layer:
    """One decoder layer: two norms and the shards of each half."""

    def __init__(self, config: ModelConfig, index: int, tensor: TensorSource,
                 dtype: torch.dtype, rope: Rope, attn_sets: Sequence[Sequence[int]],
                 mlp_sets: Sequence[Sequence[int]]) -> None:
        self.index, self.dtype, self.eps = index, dtype, config.rms_eps
        p = f"layers.{index}."
        self.attn_norm = torch.from_numpy(tensor(p + "attn_norm")).float()
        self.mlp_norm = torch.from_numpy(tensor(p + "mlp_norm")).float()
        self.attn = [AttentionShard(config, index, s, tensor, dtype, rope) for s in attn_sets]
        self.mlp = [MlpShard(config, index, s, tensor, dtype) for s in mlp_sets]

    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.attn_norm, self.eps, self.dtype)

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.mlp_norm, self.eps, self.dtype)


# (layer index, half, the layer, its normalised input x [T, d] in the compute dtype, start
# position) -> the float32 update [T, d] of the residual stream
Reducer = Callable[[int, Half, Layer, torch.Tensor, int], torch.Tensor]


def local_reduce(index: int, half: Half, layer: Layer, x: torch.Tensor, start: int
                 ) -> torch.Tensor:
    """The default: the layer half computed here, the float32 sum of the layer's own shards
    of that half (zeros [T, d] if it has none)."""
    shards: Sequence[AttentionShard | MlpShard] = layer.attn if half == "attn" else layer.mlp
    if not shards:
        return torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    return sum_partials([shard.forward(x, start) for shard in shards])


class Transformer:
    """A LLaMA-family decoder whose layers are sums of shards."""

    def __init__(self, config: ModelConfig, tensor: TensorSource, dtype: torch.dtype,
                 attn_sets: Sequence[Sequence[Sequence[int]]] | None = None,
                 mlp_sets: Sequence[Sequence[Sequence[int]]] | None = None,
                 layers: Sequence[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        """attn_sets[i] / mlp_sets[i]: the unit sets of layer i's shards (default: one shard
        with every unit). `layers` restricts which layers get weights: the others hold their
        norms only (their halves are reduced from elsewhere: a group store)."""
        self.config, self.dtype = config, dtype
        tensor = cached(tensor)
        self.rope = Rope(config)
        head = torch.from_numpy(tensor("embed" if config.tie_embeddings else "lm_head"))
        self.lm_head = head.to(dtype).contiguous()
        self.embed_table = self.lm_head if config.tie_embeddings else (
            torch.from_numpy(tensor("embed")).to(dtype))
        self.norm = torch.from_numpy(tensor("norm")).float()
        all_kv = [tuple(range(config.n_kv_heads))]
        all_mlp = [tuple(range(config.intermediate_size))]
        wanted = set(range(config.n_layers) if layers is None else layers)
        self.layers: list[Layer] = []
        for i in range(config.n_layers):
            if i not in wanted:
                self.layers.append(Layer(config, i, tensor, dtype, self.rope, [], []))
                continue
            self.layers.append(Layer(config, i, tensor, dtype, self.rope,
                                     attn_sets[i] if attn_sets else all_kv,
                                     mlp_sets[i] if mlp_sets else all_mlp))
            if progress is not None:
                progress(i)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> float32 residual stream [T, d]."""
        return self.embed_table[ids].float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream [T, d] -> float32 logits [T, vocab].

        In fp16/bf16 the logits themselves are rounded to the half type (0.016 apart near 16),
        enough to flip near-ties; the REFINE_TOP best candidates of each row are therefore
        recomputed in float32, so the top of the distribution (what greedy decoding and
        top-k/top-p sampling look at) is as exact as the body's activations allow."""
        x = rms_norm(h, self.norm, self.config.rms_eps, torch.float32)
        logits = project(x, self.lm_head).float()
        if self.dtype != torch.float32:
            top = logits.topk(REFINE_TOP, dim=-1).indices  # [T, k]
            rows = self.lm_head[top].float()  # [T, k, d]
            exact = torch.bmm(rows, x.unsqueeze(-1)).squeeze(-1)
            logits.scatter_(-1, top, exact)
        return logits

    def hidden(self, ids: torch.Tensor | Sequence[int], start: int = 0,
               reduce: Reducer = local_reduce) -> torch.Tensor:
        """The one layer loop: tokens at positions start.. (the KV caches hold positions <
        start) -> the float32 residual stream [T, d] before the final norm. Each layer half
        adds reduce(...) once: the local shards by default; the runtime plugs in a
        synchronisation round, the loader a streamed group store, calibration observers."""
        h = self.embed(torch.as_tensor(ids, dtype=torch.long))
        for i, layer in enumerate(self.layers):
            h = h + reduce(i, "attn", layer, layer.attn_input(h), start)
            h = h + reduce(i, "mlp", layer, layer.mlp_input(h), start)
        return h

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor | Sequence[int], start: int = 0,
                last_only: bool = False, reduce: Reducer = local_reduce) -> torch.Tensor:
        """Logits of tokens at positions start.. (the KV caches hold positions < start)."""
        h = self.hidden(ids, start, reduce)
        if last_only:
            h = h[-1:]
        return self.logits(h)
