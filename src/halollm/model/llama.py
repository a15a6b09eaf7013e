"""LLaMA-family decoder math, written per neuron group.

A *shard* computes the partial residual update of a set of units of one layer half:
``AttentionShard`` for a set of KV heads (and their query heads), ``MlpShard`` for a set of
intermediate neurons. A layer's update is the sum of its shards' updates; the unsplit model is
the case of one shard per half holding every unit. Nothing here knows about devices or networks:
the runtime decides which shards live where and sums what arrives.

Numerics: the residual stream ``h`` is kept in float32 whatever the compute dtype; weights,
normalised activations and shard outputs use the compute dtype. RMSNorm and RoPE follow
Hugging Face's LLaMA (norm in float32, RoPE tables in float32 cast to the compute dtype).
Weights come from a ``formats.Weights``: float tensors, or packed quantized matrices that
``project`` computes on directly (bfloat16 activations; docs/quant.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from halollm.model import quant
from halollm.model.attend import attend_one, silu_mul
from halollm.model.config import ModelConfig
from halollm.model.formats import (  # noqa: F401  (cached, TensorSource: re-exported)
    Matrix,
    TensorSource,
    Weights,
    as_weights,
    cached,
    concat,
    head_rows,
    nbytes,
)
from halollm.model.kernels import KERNELS
from halollm.model.norm import rms_norm, rms_norm_reference  # noqa: F401  (re-exported)
from halollm.model.quant_gguf import QuantEmbedding, embed_rows
from halollm.model.rope import Rope, rope_inv_freq  # noqa: F401  (re-exported)

Half = Literal["attn", "mlp"]

REFINE_TOP = 16  # logits recomputed in float32 per position when computing in fp16/bf16


def project(x: torch.Tensor, w: Matrix, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b). A packed weight computes in bfloat16 (its kernels). One-token float
    products run in the weights' dtype (bandwidth-bound GEMV); multi-token fp16 products run
    in float32, because PyTorch's CPU fp16 GEMM has no fast kernel without AVX512-FP16
    (measured 5x slower than upcasting)."""
    if not isinstance(w, torch.Tensor):
        return quant.linear(x, w, b)
    if x.shape[0] > 1 and w.dtype == torch.float16:
        return F.linear(x.float(), w.float(), None if b is None else b.float())
    return F.linear(x.to(w.dtype), w, b)


class KVCache:
    """Keys and values (float32) of one attention shard, indexed by absolute position."""

    def __init__(self, n_kv: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 capacity: int = 256) -> None:
        self.k = torch.zeros(n_kv, capacity, head_dim, dtype=dtype)
        self.v = torch.zeros(n_kv, capacity, head_dim, dtype=dtype)

    def reserve(self, end: int) -> None:
        """Room for positions up to `end` (exclusive): the capacity at least doubles."""
        if end > self.k.shape[1]:
            cap = max(end, 2 * self.k.shape[1])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.zeros(old.shape[0], cap, old.shape[2], dtype=old.dtype)
                new[:, : old.shape[1]] = old
                setattr(self, name, new)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[1]
        self.reserve(end)
        self.k[:, start:end] = k
        self.v[:, start:end] = v


def rows_of_heads(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)],
                        dtype=torch.long)


class AttentionShard:
    """Attention of a set of KV heads (and their query heads) of one layer."""

    def __init__(self, config: ModelConfig, layer: int, kv_heads: Sequence[int],
                 tensor: TensorSource | Weights, dtype: torch.dtype | None, rope: Rope
                 ) -> None:
        """Weights from `tensor` (a Weights, or a tensor function in float `dtype`)."""
        self.kv_heads = tuple(kv_heads)
        self.n_kv, self.n_q = len(self.kv_heads), len(self.kv_heads) * config.q_per_kv
        self.head_dim, self.rope = config.head_dim, rope
        weights = attention_weights(as_weights(tensor, dtype), config, layer, self.kv_heads)
        self.w_qkv, self.b_qkv, self.w_o = weights[0]
        self.cache = KVCache(self.n_kv, config.head_dim)

    @classmethod
    def without_weights(cls, config: ModelConfig, kv_heads: Sequence[int], rope: Rope
                        ) -> AttentionShard:
        """A shard holding only its KV cache: it computes through `with_weights` (weights
        streamed from a group store, read for one use)."""
        shard = cls.__new__(cls)
        shard.kv_heads = tuple(kv_heads)
        shard.n_kv, shard.n_q = len(shard.kv_heads), len(shard.kv_heads) * config.q_per_kv
        shard.head_dim, shard.rope = config.head_dim, rope
        shard.w_qkv: Matrix | None = None
        shard.b_qkv: torch.Tensor | None = None
        shard.w_o: Matrix | None = None
        shard.cache = KVCache(shard.n_kv, config.head_dim)
        return shard

    @property
    def streamed(self) -> bool:
        """True for a shard made without weights (they come with each use)."""
        return self.w_qkv is None

    def with_weights(self, weights: Sequence[Matrix | None]) -> AttentionShard:
        """This shard (its KV cache shared) computing with weights (w_qkv, b_qkv or None,
        w_o) read for this use only (a group store's `GroupWeights.tensors`)."""
        shard = copy.copy(self)
        shard.w_qkv, shard.b_qkv, shard.w_o = weights  # type: ignore[assignment]
        return shard

    def _weights(self) -> tuple[Matrix, torch.Tensor | None, Matrix]:
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
        if T == 1 and key_mask is None and KERNELS is not None and \
                self.cache.k.dtype == torch.float32:  # a decode step: in one C call
            w_qkv, b_qkv, w_o = self._weights()
            qkv = project(x, w_qkv, b_qkv)  # float32 or bfloat16: attend_one widens it
            # a packed o projection rounds its input to bfloat16: the kernel does it
            out = torch.float32 if isinstance(w_o, torch.Tensor) else quant.ACT_DTYPE
            return project(attend_one(qkv, self.n_q, self.n_kv, hd, start, self.rope,
                                      self.cache, out), w_o)
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
                 tensor: TensorSource | Weights, dtype: torch.dtype | None = None) -> None:
        self.neurons = tuple(neurons)
        (self.w_gate_up, self.w_down), _ = mlp_weights(as_weights(tensor, dtype), layer,
                                                       self.neurons)
        self.n = len(self.neurons)

    @classmethod
    def of(cls, neurons: Sequence[int], w_gate_up: Matrix, w_down: Matrix) -> MlpShard:
        """A shard over weights already read ([2n, d] gate rows then up rows; [d, n])."""
        shard = cls.__new__(cls)
        shard.neurons, shard.n = tuple(neurons), len(neurons)
        shard.w_gate_up, shard.w_down = w_gate_up, w_down
        return shard

    def activations(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """silu(gate) * up for each neuron: [T, n] (packed: in float32 from the kernel's
        bfloat16 outputs, so the down projection's input is rounded once, not three times;
        in one C call where built, `attend.silu_mul`, which can round its result to
        `dtype` itself -- else it is float32)."""
        gu = project(x, self.w_gate_up)
        if not isinstance(self.w_gate_up, torch.Tensor) or gu.dtype == torch.float32:
            fast = silu_mul(gu, self.n, dtype)
            if fast is not None:
                return fast
            gu = gu.float()
        return F.silu(gu[:, : self.n]) * gu[:, self.n:]

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        # a packed down projection rounds its input to bfloat16 first: the kernel does it
        # (the same rounding; a conversion saved)
        packed = not isinstance(self.w_down, torch.Tensor)
        return project(self.activations(x, quant.ACT_DTYPE if packed else torch.float32),
                       self.w_down)


def attention_weights(w: Weights, config: ModelConfig, layer: int, kv_heads: Sequence[int]
                      ) -> tuple[tuple[Matrix, torch.Tensor | None, Matrix], int]:
    """(q, k, v rows stacked, their biases or None, o columns) of KV heads `kv_heads` of a
    layer, and the file bytes read."""
    g, hd = config.q_per_kv, config.head_dim
    q_rows = rows_of_heads([k * g + j for k in kv_heads for j in range(g)], hd).numpy()
    kv_rows = rows_of_heads(kv_heads, hd).numpy()
    p = f"layers.{layer}."
    q, b1 = w.rows(p + "wq", q_rows)
    k, b2 = w.rows(p + "wk", kv_rows)
    v, b3 = w.rows(p + "wv", kv_rows)
    o, b4 = w.cols(p + "wo", q_rows)
    bias = None
    if config.attn_bias:
        bias = torch.cat([w.vector(p + "bq")[q_rows], w.vector(p + "bk")[kv_rows],
                          w.vector(p + "bv")[kv_rows]]).to(w.format.dtype)
    return (concat([q, k, v]), bias, o), b1 + b2 + b3 + b4


def mlp_weights(w: Weights, layer: int, neurons: Sequence[int]
                ) -> tuple[tuple[Matrix, Matrix], int]:
    """(gate rows then up rows [2n, d], down columns [d, n]) of `neurons`, and the bytes read."""
    idx = np.asarray(neurons, dtype=np.int64)
    p = f"layers.{layer}."
    gate, b1 = w.rows(p + "w_gate", idx)
    up, b2 = w.rows(p + "w_up", idx)
    down, b3 = w.cols(p + "w_down", idx)
    return (concat([gate, up]), down), b1 + b2 + b3


def sum_partials(partials: Sequence[torch.Tensor]) -> torch.Tensor:
    """The residual update of a layer half: the float32 sum of its shards' partial updates,
    added to the residual stream once (as the coordinator does with what arrives)."""
    first = partials[0]
    if len(partials) == 1:
        return first.float()
    if len(partials) > 2 and all(p.dtype == first.dtype and p.shape == first.shape
                                 for p in partials):
        return torch.stack(partials).float().sum(0)  # rows added in order, in one op
    total = first.float()
    for p in partials[1:]:
        total = total + p.float()
    return total


class Layer:
    """One decoder layer: two norms and the shards of each half."""

    def __init__(self, config: ModelConfig, index: int, weights: Weights, rope: Rope,
                 attn_sets: Sequence[Sequence[int]], mlp_sets: Sequence[Sequence[int]]) -> None:
        self.index, self.dtype, self.eps = index, weights.format.dtype, config.rms_eps
        p = f"layers.{index}."
        self.attn_norm = weights.vector(p + "attn_norm")
        self.mlp_norm = weights.vector(p + "mlp_norm")
        self.attn = [AttentionShard(config, index, s, weights, None, rope) for s in attn_sets]
        self.mlp = [MlpShard(config, index, s, weights) for s in mlp_sets]

    def weight_bytes(self) -> int:
        """Resident bytes of this layer's weights (norms and every shard's matrices)."""
        mats = [m for s in self.attn for m in (s.w_qkv, s.b_qkv, s.w_o)]
        mats += [m for s in self.mlp for m in (s.w_gate_up, s.w_down)]
        return nbytes(self.attn_norm) + nbytes(self.mlp_norm) + sum(nbytes(m) for m in mats)

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

    def __init__(self, config: ModelConfig, tensor: TensorSource | Weights,
                 dtype: torch.dtype | None = None,
                 attn_sets: Sequence[Sequence[Sequence[int]]] | None = None,
                 mlp_sets: Sequence[Sequence[Sequence[int]]] | None = None,
                 layers: Sequence[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        """attn_sets[i] / mlp_sets[i]: the unit sets of layer i's shards (default: one shard
        with every unit). `layers` restricts which layers get weights: the others hold their
        norms only (their halves are reduced from elsewhere: a group store). `tensor`: a
        Weights (any format), or a tensor function with a float `dtype`."""
        weights = as_weights(tensor, dtype)
        self.config, self.dtype, self.format = config, weights.format.dtype, weights.format
        self.rope = Rope(config)
        self.lm_head: Matrix = weights.rows("embed" if config.tie_embeddings else "lm_head")[0]
        self.embed_table: Matrix | QuantEmbedding = weights.embedding(
            self.lm_head, config.tie_embeddings)
        self.norm = weights.vector("norm")
        all_kv = [tuple(range(config.n_kv_heads))]
        all_mlp = [tuple(range(config.intermediate_size))]
        wanted = set(range(config.n_layers) if layers is None else layers)
        self.layers: list[Layer] = []
        for i in range(config.n_layers):
            if i not in wanted:
                self.layers.append(Layer(config, i, weights, self.rope, [], []))
                continue
            self.layers.append(Layer(config, i, weights, self.rope,
                                     attn_sets[i] if attn_sets else all_kv,
                                     mlp_sets[i] if mlp_sets else all_mlp))
            if progress is not None:
                progress(i)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> float32 residual stream [T, d] (a packed table dequantizes only
        the rows looked up)."""
        return embed_rows(self.embed_table, ids)

    def weight_bytes(self) -> int:
        """Resident bytes of every weight this model holds (head, embedding, norms, shards)."""
        table = 0 if self.embed_table is self.lm_head else nbytes(self.embed_table)  # type: ignore[arg-type]
        return nbytes(self.lm_head) + table + nbytes(self.norm) + sum(
            layer.weight_bytes() for layer in self.layers)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream [T, d] -> float32 logits [T, vocab].

        In fp16/bf16 the logits themselves are rounded to the half type (0.016 apart near 16),
        enough to flip near-ties; the REFINE_TOP best candidates of each row are therefore
        recomputed in float32, so the top of the distribution (what greedy decoding and
        top-k/top-p sampling look at) is as exact as the body's activations allow."""
        x = self.head_input(h)
        return self.refine(x, project(x, self.lm_head).float())

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's input: the final RMSNorm of the residual stream, in float32."""
        return rms_norm(h, self.norm, self.config.rms_eps, torch.float32)

    def refine(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [T, vocab] (float32, of the head's product in the compute dtype) with
        their REFINE_TOP best recomputed in float32 from x [T, d] (in place)."""
        if self.dtype != torch.float32:
            top = logits.topk(REFINE_TOP, dim=-1).indices  # [T, k]
            rows = head_rows(self.lm_head, top.reshape(-1)).reshape(*top.shape, -1)  # [T, k, d]
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
