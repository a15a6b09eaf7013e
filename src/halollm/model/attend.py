"""The attention of one query position in one C call (`_kernels.attend`): RoPE on the
position's q and k rows, its k and v written to the KV cache, each query head attending to
every cached position of its KV head. AttentionShard.forward's decode path where the
kernels are built; the torch operators it replaces (about twenty, each dispatched) stay the
path of prompts, masked rounds and builds without a C compiler."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from halollm.model.kernels import KERNELS

if TYPE_CHECKING:
    from halollm.model.llama import KVCache
    from halollm.model.rope import Rope


def attend_one(qkv: torch.Tensor, n_q: int, n_kv: int, head_dim: int, pos: int, rope: Rope,
               cache: KVCache) -> torch.Tensor:
    """float32 [1, n_q * head_dim]: the attention output of one position `pos` whose q, k, v
    rows are qkv (float32 [1, (n_q + 2 n_kv) * head_dim]); its k and v enter `cache`."""
    qkv = qkv.contiguous()
    cos, sin = rope.tables(pos + 1)
    cache.reserve(pos + 1)
    out = torch.empty(1, n_q * head_dim)
    row = 4 * head_dim * pos  # bytes to the position's row of the float32 tables
    KERNELS.attend(out.data_ptr(), qkv.data_ptr(), n_q, n_kv, head_dim, pos,  # type: ignore[union-attr]
                   cos.data_ptr() + row, sin.data_ptr() + row, cache.k.data_ptr(),
                   cache.v.data_ptr(), cache.k.shape[1])
    return out
