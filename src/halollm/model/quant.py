"""Packed weights: quantized matrices [out, in] that PyTorch's CPU weight-only kernels compute
on directly, without ever holding a float copy.

* ``Int4Weight``: 4-bit values in groups of 32 along the input dimension, one (scale, zero)
  per group and output row: ``w = (q - 8) * scale + zero``, q in 0..15
  (``aten._weight_int4pack_mm_for_cpu``). Q4_0, Q4_1 and Q4_K map onto it exactly.
* ``Int8Weight``: int8 values, one scale per output row: ``w = q * scale``
  (``aten._weight_int8pack_mm``). Any set of columns of it is exact.
* ``Int4PairWeight``: int8 values with one scale per 32-group (Q8_0's own form), computed
  exactly as two Int4Weights: ``q = 16 * hi + lo`` with hi in -8..7 and lo in 0..15.
* ``RowConcat``: row blocks of different kinds stacked (q/k/v of mixed-type files).

Both kernels are fast on x86 CPUs only with bfloat16 activations (fp32/fp16 fall back to a
scalar loop ~35x slower, measured in docs/quant.md), so scales and zeros are bfloat16 and
``linear`` returns bfloat16. GGUF conversions are in ``quant_gguf``; docs: docs/quant.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GROUP = 32  # input columns per int4 group (= one Q4_0/Q4_1/Q8_0 block)
ACT_DTYPE = torch.bfloat16  # the activation dtype the CPU kernels are fast for
# _weight_int8pack_mm crashes (no check) when in_features % 8 != 0 and computes garbage (reads
# past the row) when it is not a multiple of 16 (measured: K = 72, 88, 104 wrong; 80, 96 right)
_INT8_K_MULTIPLE = 16
_PACK_CHUNK_ROWS = 4096  # rows converted per call (bounds the int32 transient of the op)


def _bf16(a: np.ndarray) -> np.ndarray:
    """a rounded to bfloat16, as float32 (what the kernels will see)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().float().numpy()


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class Int4Layout:
    """How ``_convert_weight_to_int4pack_for_cpu`` arranges nibbles on this CPU: rows in
    blocks of ``block_n``; within a block, input column k's values take ``block_n / 2`` bytes
    at ``k * block_n / 2``; row r of the block sits in byte ``offset[r]``, nibble ``shift[r]``.
    (AVX2: 32-row blocks, rows r and r+16 share a byte; AVX512: 64-row blocks; scalar: pairs.)"""

    block_n: int
    offset: np.ndarray
    shift: np.ndarray


@functools.cache
def int4_layout() -> Int4Layout:
    """Probe the packing op once (64x32 values in three 4-bit planes) and derive its layout."""
    n, k = 64, 32
    index = np.arange(n * k, dtype=np.int64).reshape(n, k)
    where = np.zeros(n * k, dtype=np.int64)
    for plane in range(3):
        q = torch.from_numpy(((index >> (4 * plane)) & 15).astype(np.int32))
        flat = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).numpy().reshape(-1)
        nibbles = np.stack([flat & 15, flat >> 4], axis=1).reshape(-1).astype(np.int64)
        where += nibbles << (4 * plane)
    pos = np.empty(n * k, dtype=np.int64)
    pos[where] = np.arange(n * k)  # pos[n*k + k] = nibble position of value (n, k)
    byte, high = (pos // 2).reshape(n, k), (pos % 2).reshape(n, k)
    rows, cols = np.arange(n)[:, None], np.arange(k)[None, :]
    for bn in (16, 32, 64):
        offset, shift = byte[:bn, 0].copy(), 4 * high[:bn, 0]
        expect = (rows // bn) * (k * bn // 2) + cols * (bn // 2) + offset[rows % bn]
        if (expect == byte).all() and (4 * high == shift[rows % bn]).all():
            return Int4Layout(bn, offset, shift)
    raise RuntimeError("unknown int4 pack layout of this PyTorch build; packed-weight slicing "
                       "(rows, values, dequantize) needs support for it in halollm.model.quant")


def _as_input(x: torch.Tensor, in_features: int, padded: int) -> torch.Tensor:
    """x [..., in] as the kernels need it: 2-D, bfloat16, contiguous, zero-padded. The shape
    is checked here because the kernels do not check it (a mismatch segfaults)."""
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {in_features}")
    if padded == in_features and x.dtype == ACT_DTYPE and x.dim() == 2 and x.is_contiguous():
        return x  # already so (a decode step's input): four dispatches saved, ~3 us a call
    x2 = x.reshape(-1, in_features).to(ACT_DTYPE)
    if padded != in_features:
        x2 = F.pad(x2, (0, padded - in_features))
    return x2.contiguous()


def _as_output(y: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    if x.dim() == 2 and y.shape[1] == out_features:
        return y  # already [rows, out]
    if y.shape[1] != out_features:
        y = y[:, :out_features]
    return y.reshape(*x.shape[:-1], out_features)


def _expand_groups(a: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(a, GROUP, axis=1)[:, :k]


class Int4Weight:
    """A [out, in] matrix of 4-bit values with a bfloat16 (scale, zero) per 32-group."""

    kind = "int4"

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, out_features: int,
                 in_features: int) -> None:
        self.packed = packed  # uint8 [out padded, in padded / 2], int4_layout() order
        self.scale_zeros = scale_zeros  # bfloat16 [in padded / 32, out padded, 2]
        self.out_features, self.in_features = out_features, in_features

    @classmethod
    def from_values(cls, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> Int4Weight:
        """q uint8 [n, k] in 0..15; scale, zero [n, ceil(k / 32)]: w = (q - 8) * scale + zero.
        Rows are padded to the layout's block (zero weights), columns to 32."""
        n, k = q.shape
        n_pad, k_pad = _ceil(max(n, 1), int4_layout().block_n), _ceil(k, GROUP)
        if scale.shape != (n, k_pad // GROUP) or zero.shape != scale.shape:
            raise ValueError(f"scale/zero must be [{n}, {k_pad // GROUP}]")
        qp = np.full((n_pad, k_pad), 8, dtype=np.int32)
        qp[:n, :k] = q
        sz = np.zeros((k_pad // GROUP, n_pad, 2), dtype=np.float32)
        sz[:, :n, 0], sz[:, :n, 1] = scale.T, zero.T
        qt = torch.from_numpy(qp)
        packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            qt[s:s + _PACK_CHUNK_ROWS].contiguous(), 1)
            for s in range(0, n_pad, _PACK_CHUNK_ROWS)])
        return cls(packed, torch.from_numpy(sz).to(ACT_DTYPE), n, k)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x @ w.T [..., out] in bfloat16."""
        x2 = _as_input(x, self.in_features, 2 * self.packed.shape[1])
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scale_zeros)
        return _as_output(y, x, self.out_features)

    def values(self, rows: Sequence[int] | np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q uint8 [r, in], scale, zero float32 [r, groups]) of `rows` (default: all),
        unpacked from the packed bytes of those rows only."""
        lay = int4_layout()
        idx = np.arange(self.out_features) if rows is None else np.asarray(rows, dtype=np.int64)
        k = 2 * self.packed.shape[1]
        blocks = self.packed.numpy().reshape(-1, k, lay.block_n // 2)
        r = idx % lay.block_n
        b = blocks[(idx // lay.block_n)[:, None], np.arange(k)[None, :], lay.offset[r][:, None]]
        q = ((b >> lay.shift[r][:, None]) & 15).astype(np.uint8)[:, : self.in_features]
        sz = self.scale_zeros[:, torch.from_numpy(idx)].float().numpy()
        return q, np.ascontiguousarray(sz[..., 0].T), np.ascontiguousarray(sz[..., 1].T)

    def dequantize(self, rows: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """float32 [r, in]: exactly the weights the kernel multiplies by."""
        q, scale, zero = self.values(rows)
        k = self.in_features
        w = (q.astype(np.float32) - 8) * _expand_groups(scale, k) + _expand_groups(zero, k)
        return torch.from_numpy(w)

    def rows(self, rows: Sequence[int] | np.ndarray) -> Int4Weight:
        """The output channels `rows` (any order): exact."""
        return Int4Weight.from_values(*self.values(rows))

    def column_blocks(self, blocks: Sequence[int] | np.ndarray) -> Int4Weight:
        """Input columns 32*b .. 32*b+31 of each group b in `blocks` (in that order): a byte
        gather of the packed data, exact."""
        if self.in_features % GROUP:
            raise ValueError("column_blocks needs in_features to be a multiple of 32")
        b = np.asarray(blocks, dtype=np.int64)
        cols = (b[:, None] * GROUP + np.arange(GROUP)).reshape(-1)
        bn = int4_layout().block_n
        view = self.packed.numpy().reshape(-1, 2 * self.packed.shape[1], bn // 2)
        packed = np.ascontiguousarray(view[:, cols]).reshape(self.packed.shape[0], -1)
        sz = self.scale_zeros[torch.from_numpy(b)].contiguous()
        return Int4Weight(torch.from_numpy(packed), sz, self.out_features, len(cols))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale_zeros.numel() * self.scale_zeros.element_size()


class Int8Weight:
    """A [out, in] matrix of int8 values with one bfloat16 scale per output row."""

    kind = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, in_features: int) -> None:
        self.q = q  # int8 [out, in padded to a multiple of 8]
        self.scale = scale  # bfloat16 [out]
        self.out_features, self.in_features = q.shape[0], in_features

    @classmethod
    def from_values(cls, q: np.ndarray, scale: np.ndarray) -> Int8Weight:
        """q int8 [n, k], scale [n]: w = q * scale."""
        n, k = q.shape
        qp = np.zeros((n, _ceil(k, _INT8_K_MULTIPLE)), dtype=np.int8)
        qp[:, :k] = q
        return cls(torch.from_numpy(qp), torch.from_numpy(
            np.asarray(scale, dtype=np.float32)).to(ACT_DTYPE), k)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _as_input(x, self.in_features, self.q.shape[1])
        return _as_output(torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale), x,
                          self.out_features)

    def values(self, rows: Sequence[int] | np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        q, s = self.q.numpy()[:, : self.in_features], self.scale.float().numpy()
        if rows is None:
            return q, s
        idx = np.asarray(rows, dtype=np.int64)
        return q[idx], s[idx]

    def dequantize(self, rows: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        q, s = self.values(rows)
        return torch.from_numpy(q.astype(np.float32) * s[:, None])

    def rows(self, rows: Sequence[int] | np.ndarray) -> Int8Weight:
        return Int8Weight.from_values(*self.values(rows))

    def columns(self, cols: Sequence[int] | np.ndarray) -> Int8Weight:
        """Any input columns, in any order: exact (the scales are per row)."""
        q, s = self.values()
        return Int8Weight.from_values(q[:, np.asarray(cols, dtype=np.int64)], s)

    def column_blocks(self, blocks: Sequence[int] | np.ndarray) -> Int8Weight:
        b = np.asarray(blocks, dtype=np.int64)
        return self.columns((b[:, None] * GROUP + np.arange(GROUP)).reshape(-1))

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


class Int4PairWeight:
    """int8 values with a scale per 32-group (Q8_0), as hi * 16 * d + lo * d: two int4
    matmuls, exact (to bfloat16 rounding of d)."""

    kind = "int4x2"

    def __init__(self, hi: Int4Weight, lo: Int4Weight) -> None:
        self.hi, self.lo = hi, lo
        self.out_features, self.in_features = hi.out_features, hi.in_features

    @classmethod
    def from_int8_blocks(cls, q: np.ndarray, d: np.ndarray) -> Int4PairWeight:
        """q int8 [n, k], d [n, k / 32]: w = q * d."""
        d = _bf16(d)
        hi = (q.astype(np.int16) >> 4).astype(np.int8)  # -8..7 (arithmetic shift)
        lo = (q.astype(np.int16) & 15).astype(np.uint8)  # 0..15
        zeros = np.zeros_like(d)
        return cls(Int4Weight.from_values((hi + 8).astype(np.uint8), 16 * d, zeros),
                   Int4Weight.from_values(lo, d, 8 * d))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.hi.linear(x) + self.lo.linear(x)

    def dequantize(self, rows: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        return self.hi.dequantize(rows) + self.lo.dequantize(rows)

    def rows(self, rows: Sequence[int] | np.ndarray) -> Int4PairWeight:
        return Int4PairWeight(self.hi.rows(rows), self.lo.rows(rows))

    def column_blocks(self, blocks: Sequence[int] | np.ndarray) -> Int4PairWeight:
        return Int4PairWeight(self.hi.column_blocks(blocks), self.lo.column_blocks(blocks))

    @property
    def nbytes(self) -> int:
        return self.hi.nbytes + self.lo.nbytes


class RowConcat:
    """Packed row blocks of different kinds stacked: outputs concatenated in order."""

    kind = "rows"

    def __init__(self, parts: Sequence[PackedWeight]) -> None:
        self.parts = list(parts)
        self.out_features = sum(p.out_features for p in self.parts)
        self.in_features = self.parts[0].in_features

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.linear(x) for p in self.parts], dim=-1)

    def dequantize(self, rows: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        w = torch.cat([p.dequantize() for p in self.parts])
        return w if rows is None else w[torch.as_tensor(np.asarray(rows), dtype=torch.long)]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


PackedWeight = Int4Weight | Int8Weight | Int4PairWeight | RowConcat


def concat_rows(parts: Sequence[PackedWeight]) -> PackedWeight:
    """Stack packed matrices with the same in_features along the output dimension (q, k, v;
    gate, up). Same-kind parts become one matrix (one kernel call); mixed kinds a RowConcat."""
    if len({p.in_features for p in parts}) != 1:
        raise ValueError("concat_rows needs the same in_features")
    kinds = {p.kind for p in parts}
    if len(parts) == 1:
        return parts[0]
    if kinds == {"int4"}:
        vals = [p.values() for p in parts]  # type: ignore[union-attr]
        return Int4Weight.from_values(*(np.concatenate([v[i] for v in vals]) for i in range(3)))
    if kinds == {"int8"}:
        vals8 = [p.values() for p in parts]  # type: ignore[union-attr]
        return Int8Weight.from_values(np.concatenate([v[0] for v in vals8]),
                                      np.concatenate([v[1] for v in vals8]))
    if kinds == {"int4x2"}:
        return Int4PairWeight(concat_rows([p.hi for p in parts]),  # type: ignore[union-attr,arg-type]
                              concat_rows([p.lo for p in parts]))  # type: ignore[union-attr,arg-type]
    return RowConcat(parts)


def linear(x: torch.Tensor, w: torch.Tensor | PackedWeight, b: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x @ w.T (+ b) for a float tensor (in its dtype) or a packed weight (in bfloat16)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x.to(w.dtype), w, b)
    y = w.linear(x)
    return y if b is None else y + b.to(y.dtype)


# ---- quantizing float matrices (requantization of other GGUF types, `q4`/`q8` on request) ----

def int4_values(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit per 32-group (like Q4_1, with bfloat16 scale and zero): (q, scale, zero)."""
    n, k = w.shape
    wp = np.pad(w.astype(np.float32, copy=False), ((0, 0), (0, _ceil(k, GROUP) - k)), mode="edge")
    g = wp.reshape(n, -1, GROUP)
    lo, hi = g.min(-1), g.max(-1)
    scale = _bf16((hi - lo) / 15)
    zero = _bf16(lo + 8 * scale)
    safe = np.where(scale == 0, 1, scale)
    q = np.clip(np.rint((g - zero[..., None]) / safe[..., None]) + 8, 0, 15).astype(np.uint8)
    return q.reshape(n, -1)[:, :k], scale, zero


def int8_values(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row (bfloat16 scale = max |w| / 127): (q, scale)."""
    scale = _bf16(np.abs(w).max(axis=1) / 127)
    safe = np.where(scale == 0, 1, scale)
    return np.clip(np.rint(w / safe[:, None]), -128, 127).astype(np.int8), scale


def int8_block_values(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per 32-group (Q8_0's scheme, bfloat16 d): (q [n, k], d [n, k/32])."""
    n, k = w.shape
    g = np.pad(w.astype(np.float32, copy=False), ((0, 0), (0, _ceil(k, GROUP) - k))
               ).reshape(n, -1, GROUP)
    d = _bf16(np.abs(g).max(-1) / 127)
    safe = np.where(d == 0, 1, d)
    q = np.clip(np.rint(g / safe[..., None]), -128, 127).astype(np.int8)
    return q.reshape(n, -1)[:, :k], d


def quantize(w: np.ndarray | torch.Tensor, layout: str) -> PackedWeight:
    """Pack a float matrix [out, in]: layout 'int4' (q4), 'int8' (q8) or 'int4x2'."""
    a = w.float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float32)
    if layout in ("int4", "q4"):
        return Int4Weight.from_values(*int4_values(a))
    if layout in ("int8", "q8"):
        return Int8Weight.from_values(*int8_values(a))
    if layout == "int4x2":
        return Int4PairWeight.from_int8_blocks(*int8_block_values(a))
    raise ValueError(f"unknown packed layout '{layout}' (int4, int8, int4x2)")
