"""GGUF tensors -> packed weights (``halollm.model.quant``), from the raw quantized blocks.

Only the rows or column blocks asked for are read. Q4_0, Q4_1 and Q4_K become ``Int4Weight``
and Q8_0 ``Int4PairWeight`` exactly (their nibbles/bytes are re-laid out, the scales rounded
to bfloat16, nothing is requantized); the other types are dequantized block by block and
requantized to the layout in DEFAULT_LAYOUT (errors measured in docs/quant.md); float tensors
are packed only on request (layout 'int4'/'int8'/'int4x2').
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from halollm.model.gguf_file import SUPPORTED_ARCHS, unpermute_rows
from halollm.model.quant import (
    GROUP,
    Int4PairWeight,
    Int4Weight,
    Int8Weight,
    PackedWeight,
    _bf16,
    int4_values,
    int8_block_values,
    int8_values,
)

FLOAT_TYPES = {"F32", "F16", "BF16"}
# The packed layout each GGUF type becomes unless asked otherwise (docs/quant.md: why).
DEFAULT_LAYOUT = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int4x2",
                  "Q5_0": "int4", "Q5_1": "int4", "Q5_K": "int4", "Q2_K": "int4",
                  "Q3_K": "int4", "Q6_K": "int8"}
_DEQUANT_CHUNK_ROWS = 2048  # rows dequantized at a time when requantizing


def _f16(field: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> float32 [...] (a block's fp16 scale)."""
    return np.ascontiguousarray(field).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def q4_0_values(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 (w = d * (q - 8)) -> int4 (q, scale = d, zero = 0)."""
    b = raw.reshape(raw.shape[0], k // 32, 18)
    d = _f16(b[..., :2])
    return _nibbles(b[..., 2:]).reshape(-1, k), _bf16(d), np.zeros_like(d)


def q4_1_values(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 (w = d * q + m) -> int4 (q, scale = d, zero = m + 8 d)."""
    b = raw.reshape(raw.shape[0], k // 32, 20)
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
    return _nibbles(b[..., 4:]).reshape(-1, k), _bf16(d), _bf16(m + 8 * d)


def q4_k_values(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K (256-blocks of eight 32-sub-blocks, w = d * sc * q - dmin * mn) -> int4
    (q, scale = d * sc, zero = 8 * scale - dmin * mn): exact, the sub-blocks are 32-groups."""
    from gguf.quants import Q4_K

    n = raw.shape[0]
    b = raw.reshape(n, k // 256, 144)
    d, dmin = _f16(b[..., :2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
    scale = d * sc.reshape(n, -1, 8).astype(np.float32)
    zero = 8 * scale - dmin * mn.reshape(n, -1, 8).astype(np.float32)
    qs = b[..., 16:].reshape(n, -1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(
        1, 1, 1, 2, 1)
    q = (qs & 15).reshape(n, k)
    return q, _bf16(scale.reshape(n, -1)), _bf16(zero.reshape(n, -1))


def q8_0_values(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 (w = d * q) -> (q int8 [n, k], d [n, k / 32])."""
    b = raw.reshape(raw.shape[0], k // 32, 34)
    return np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(-1, k), _f16(b[..., :2])


_EXACT_INT4 = {"Q4_0": q4_0_values, "Q4_1": q4_1_values, "Q4_K": q4_k_values}


def is_exact(qtype: str, layout: str | None = None) -> bool:
    """Whether packing `qtype` into `layout` keeps its values (only scales rounded to bf16)."""
    layout = layout or DEFAULT_LAYOUT.get(qtype)
    return (layout == "int4" and qtype in _EXACT_INT4) or (layout, qtype) == ("int4x2", "Q8_0")


def dequantize_raw(raw: np.ndarray, qtype: str, k: int) -> np.ndarray:
    """float32 [n, k] of raw GGUF rows (gguf's own dequantizer: the reference)."""
    import gguf

    data = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    return np.asarray(data, dtype=np.float32).reshape(-1, k)


def _requantize(raw: np.ndarray, qtype: str, k: int, layout: str) -> PackedWeight:
    """Dequantize `_DEQUANT_CHUNK_ROWS` rows at a time and quantize them to `layout`."""
    fn = {"int4": int4_values, "int8": int8_values, "int4x2": int8_block_values}[layout]
    parts = [fn(dequantize_raw(raw[s:s + _DEQUANT_CHUNK_ROWS], qtype, k))
             for s in range(0, raw.shape[0], _DEQUANT_CHUNK_ROWS)]
    vals = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    if layout == "int4":
        return Int4Weight.from_values(*vals)
    if layout == "int8":
        return Int8Weight.from_values(*vals)
    return Int4PairWeight.from_int8_blocks(*vals)


def pack_raw(raw: np.ndarray, qtype: str, k: int, layout: str | None = None) -> PackedWeight:
    """Raw GGUF rows (uint8 [n, row bytes], or float [n, k]) of type `qtype` with `k` columns
    -> a packed weight [n, k] in `layout` (default: DEFAULT_LAYOUT[qtype])."""
    layout = {"q4": "int4", "q8": "int8"}.get(layout or "", layout) or DEFAULT_LAYOUT.get(qtype)
    if layout is None:
        raise ValueError(f"{qtype} tensors are packed only on request: choose a layout "
                         "(int4 / q4, int8 / q8, int4x2)")
    if layout not in ("int4", "int8", "int4x2"):
        raise ValueError(f"unknown packed layout '{layout}' (int4, int8, int4x2)")
    raw = np.asarray(raw)
    if layout == "int4" and qtype in _EXACT_INT4:
        return Int4Weight.from_values(*_EXACT_INT4[qtype](raw, k))
    if layout == "int4x2" and qtype == "Q8_0":
        return Int4PairWeight.from_int8_blocks(*q8_0_values(raw, k))
    return _requantize(raw, qtype, k, layout)


# ---- reading from a GGUFModelFile ----

def _tensor(source: Any, name: str) -> Any:
    """The gguf ReaderTensor of a canonical name (GGUFModelFile has no public accessor)."""
    return source._tensors[name]


def _row_order(source: Any, name: str, n: int) -> np.ndarray | None:
    """GGUF row of each canonical row: llama.cpp permutes q/k rows of `llama` models."""
    leaf = name.rsplit(".", 1)[-1]
    heads = {"wq": source.config.n_heads, "wk": source.config.n_kv_heads}.get(leaf)
    if not SUPPORTED_ARCHS[source.arch] or heads is None:
        return None
    return unpermute_rows(np.arange(n), heads)


def shape(source: Any, name: str) -> tuple[int, int, str]:
    """(out, in, GGUF type name) of a matrix."""
    t = _tensor(source, name)
    return int(t.shape[1]), int(t.shape[0]), t.tensor_type.name


def pack_rows(source: Any, name: str, rows: np.ndarray | None = None,
              layout: str | None = None) -> tuple[PackedWeight, int]:
    """Canonical rows `rows` (default all; any rows, any order, q/k need not be whole heads)
    of a matrix, packed from their raw blocks only; and the file bytes read."""
    t = _tensor(source, name)
    n, k, qtype = shape(source, name)
    order = _row_order(source, name, n)
    idx = None if rows is None else np.asarray(rows, dtype=np.int64)
    if order is not None:
        idx = order if idx is None else order[idx]
    raw = t.data if idx is None else t.data[idx]
    return pack_raw(raw, qtype, k, layout), int(raw.nbytes)


def whole_groups(cols: np.ndarray) -> bool:
    """Whether `cols` is a sequence of whole, 32-aligned column groups (any group order)."""
    cols = np.asarray(cols, dtype=np.int64)
    if len(cols) == 0 or len(cols) % GROUP:
        return False
    g = cols.reshape(-1, GROUP)
    return bool((g[:, 0] % GROUP == 0).all() and (g - g[:, :1] == np.arange(GROUP)).all())


def pack_columns(source: Any, name: str, cols: np.ndarray, layout: str | None = None,
                 scattered: str = "int8") -> tuple[PackedWeight, int]:
    """Columns `cols` (in that order) of a matrix and the file bytes read. Whole 32-aligned
    groups are cut from the packed blocks (exact); any other set is dequantized from the
    blocks it touches and requantized to `scattered` ('int8': per-row scales, measured
    near-exact; 'int4': requantized 32-groups, measured lossy; docs/quant.md)."""
    import gguf

    t = _tensor(source, name)
    n, k, qtype = shape(source, name)
    cols = np.asarray(cols, dtype=np.int64)
    if not whole_groups(cols) or qtype in FLOAT_TYPES:
        w, nbytes = source.cols(name, cols)
        return pack_raw(w, "F32", len(cols), layout if qtype in FLOAT_TYPES and layout
                        else scattered), nbytes
    block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
    order = _row_order(source, name, n)
    data = t.data if order is None else t.data[order]
    groups = cols[::GROUP] // GROUP
    qblocks = np.unique(groups * GROUP // block)
    raw = np.ascontiguousarray(data.reshape(n, -1, block_bytes)[:, qblocks]).reshape(n, -1)
    w = pack_raw(raw, qtype, len(qblocks) * block, layout)
    per = block // GROUP
    local = np.searchsorted(qblocks, groups // per) * per + groups % per
    if not np.array_equal(local, np.arange(w.in_features // GROUP)):
        w = w.column_blocks(local)  # type: ignore[union-attr]
    return w, int(raw.nbytes)


class QuantEmbedding:
    """An embedding table kept as its GGUF blocks (exactly the file's bytes); only the rows
    looked up are dequantized (gguf's dequantizer: bit-identical to the float loader)."""

    def __init__(self, raw: np.ndarray, qtype: str, dim: int) -> None:
        self.raw, self.qtype, self.dim = raw, qtype, dim

    @classmethod
    def from_source(cls, source: Any, name: str = "embed") -> QuantEmbedding:
        t = _tensor(source, name)
        return cls(np.array(t.data), t.tensor_type.name, int(t.shape[0]))  # copy: file closes

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> float32 [T, dim]."""
        rows = self.raw[np.asarray(ids, dtype=np.int64).reshape(-1)]
        return torch.from_numpy(dequantize_raw(rows, self.qtype, self.dim).copy())

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)


def embed_rows(table: QuantEmbedding | PackedWeight | torch.Tensor, ids: torch.Tensor
               ) -> torch.Tensor:
    """Embedding rows of token ids [T] as float32 [T, d], whatever holds the table: a
    QuantEmbedding, a packed (tied) LM head, or a float tensor."""
    if isinstance(table, QuantEmbedding):
        return table.lookup(ids)
    if isinstance(table, torch.Tensor):
        return table[ids].float()
    return table.dequantize(np.asarray(ids, dtype=np.int64).reshape(-1))


def gguf_nbytes(source: Any, name: str) -> int:
    """Bytes of a tensor in the file (the baseline for resident packed bytes)."""
    return int(_tensor(source, name).data.nbytes)
