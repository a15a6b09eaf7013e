"""A decode step's shard operators in one C call each (`_kernels.c`), where it is built.

`attend_one`: the attention of one query position (RoPE on its q and k rows, its k and v
written to the KV cache, each query head attending to every cached position of its KV head):
AttentionShard.forward's decode path; the ~20 torch operators it replaces stay the path of
prompts, masked rounds and builds without a C compiler. `silu_mul`: a SwiGLU MLP's
activations from its gate and up values (MlpShard.activations)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from halollm.model.kernels import KERNELS

if TYPE_CHECKING:
    from halollm.model.llama import KVCache
    from halollm.model.rope import Rope


_KINDS = {torch.float32: 0, torch.bfloat16: 2}  # as _kernels.c names them


def attend_one(qkv: torch.Tensor, n_q: int, n_kv: int, head_dim: int, pos: int, rope: Rope,
               cache: KVCache, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, n_q * head_dim] in `dtype` (float32, or bfloat16: the float32 result rounded as
    `.to` rounds it): the attention output of one position `pos` whose q, k, v rows are qkv
    ([1, (n_q + 2 n_kv) * head_dim], float32 or bfloat16: the kernel widens it, exactly, as
    `.float()` would); its k and v enter `cache`."""
    if qkv.dtype not in _KINDS:
        qkv = qkv.float()
    qkv = qkv.contiguous()
    cos, sin = rope.tables(pos + 1)
    cache.reserve(pos + 1)
    out = torch.empty(1, n_q * head_dim, dtype=dtype)
    row = 4 * head_dim * pos  # bytes to the position's row of the float32 tables
    KERNELS.attend(out.data_ptr(), qkv.data_ptr(), n_q, n_kv, head_dim, pos,  # type: ignore[union-attr]
                   cos.data_ptr() + row, sin.data_ptr() + row, cache.k.data_ptr(),
                   cache.v.data_ptr(), cache.k.shape[1], _KINDS[dtype], _KINDS[qkv.dtype])
    return out


def silu_mul(gu: torch.Tensor, n: int, dtype: torch.dtype = torch.float32
             ) -> torch.Tensor | None:
    """[T, n] in `dtype` (float32 or bfloat16): silu(gu[:, :n]) * gu[:, n:] computed in
    float32 from gu [T, 2n] (float32 or bfloat16), then rounded to `dtype` as `.to(dtype)`
    rounds; None where the kernels are not built or gu does not fit."""
    kind, out_kind = _KINDS.get(gu.dtype), _KINDS.get(dtype)
    if KERNELS is None or kind is None or out_kind is None or gu.dim() != 2 or \
            gu.shape[1] != 2 * n or not gu.is_contiguous() or gu.shape[0] == 0:
        return None
    out = torch.empty(gu.shape[0], n, dtype=dtype)
    KERNELS.silu_mul(out.data_ptr(), gu.data_ptr(), kind, gu.shape[0], n,  # type: ignore[union-attr]
                     out_kind)
    return out
