"""Weight formats: how a device holds a model's matrices, and the reader that builds them.

A format is either *float* (``fp32``, ``fp16``, ``bf16``: every matrix dequantized to that
dtype, the exactness path) or *packed* (``gguf``: the file's quantized types kept quantized in
the layouts of ``quant_gguf.DEFAULT_LAYOUT``; ``q4`` / ``q8``: every matrix packed to int4 /
int8, for float models). Packed formats compute with bfloat16 activations (the dtype PyTorch's
CPU weight-only kernels are fast for); a float matrix inside a packed ``gguf`` model stays
float (fp16). ``Weights`` reads any matrix of a source in a format, whole or by rows/columns,
so that every device -- single, coordinator, worker, the loader's store -- builds the same
weights for the same units. docs/quant.md says which format is chosen when.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from halollm.errors import ModelLoadError
from halollm.model import quant
from halollm.model import quant_gguf as G

TensorSource = Callable[[str], np.ndarray]  # canonical name -> float32 array
Matrix = torch.Tensor | quant.PackedWeight

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The names PyTorch and other tools use, accepted beside ours (--dtype half, …).
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
# The float dtype chosen by `halo bench engine` (docs/results/engine.md): the fastest whose
# greedy output and top-1 agreement with fp32 stay >= 99% on the check text.
DEFAULT_DTYPE = "fp16"
PACKED = ("gguf", "q4", "q8")
QUANT_CHOICES = ("auto", "q4", "q8", "none")
_LAYOUT_BYTES = {"int4": 0.5 + 4 / quant.GROUP, "int8": 1.0, "int4x2": 2 * (0.5 + 4 / quant.GROUP)}
PACK_CHUNK_ROWS = 4096  # rows of a large matrix packed at a time (a multiple of 64)
SCATTER_LIMIT = 2.0  # a column set kept as whole blocks if they hold at most 2x its columns


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


def canonical_dtype(name: str) -> str:
    """fp32, fp16, bf16 or auto for any accepted spelling (float16, half, BF16, …)."""
    key = name.strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES and key != "auto":
        raise ModelLoadError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)}, auto; "
                             f"or {', '.join(DTYPE_ALIASES)})")
    return key


@dataclass(frozen=True)
class WeightFormat:
    """fp32 | fp16 | bf16 (float weights in that dtype) or gguf | q4 | q8 (packed)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in DTYPES and self.name not in PACKED:
            raise ModelLoadError(f"unknown weight format '{self.name}' "
                                 f"({', '.join([*DTYPES, *PACKED])})")

    @classmethod
    def of_dtype(cls, dtype: torch.dtype) -> WeightFormat:
        """The float format of a torch dtype."""
        return cls(next(k for k, v in DTYPES.items() if v == dtype))

    @property
    def packed(self) -> bool:
        return self.name in PACKED

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of activations and shard outputs."""
        return quant.ACT_DTYPE if self.packed else DTYPES[self.name]

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of matrices kept float (all of them in a float format)."""
        return DTYPES[DEFAULT_DTYPE] if self.packed else DTYPES[self.name]

    def layout_for(self, qtype: str) -> str | None:
        """The packed layout of a matrix of (GGUF) type `qtype`; None: kept float."""
        if not self.packed:
            return None
        if self.name in ("q4", "q8"):
            return "int4" if self.name == "q4" else "int8"
        return G.DEFAULT_LAYOUT.get(qtype)


def has_quantized_matrices(source: Any) -> bool:
    return any(source.tensor_type(n) not in G.FLOAT_TYPES and not n.endswith("norm")
               for n in source.names())


def resolve_format(source: Any, dtype: str | None = None, quant_choice: str | None = None
                   ) -> WeightFormat:
    """The format for `--dtype` and `--quant` (None: not given). Nothing given: a quantized
    model keeps its quantized types packed (gguf), a float model runs in DEFAULT_DTYPE. An
    explicit float `--dtype` without `--quant` means dequantized weights in that dtype (the
    exactness path). `--quant none` is the float path in `--dtype`; `--quant q4|q8|auto`
    pack, and compute in bf16 (a float `--dtype` other than bf16 beside them is an error)."""
    key = "auto" if dtype is None else canonical_dtype(dtype)
    if quant_choice is None:
        quant_choice = "auto" if key == "auto" else "none"
    elif quant_choice not in QUANT_CHOICES:
        raise ModelLoadError(f"unknown --quant '{quant_choice}' ({', '.join(QUANT_CHOICES)})")
    if quant_choice == "none":
        return WeightFormat(DEFAULT_DTYPE if key == "auto" else key)
    if key not in ("auto", "bf16"):
        raise ModelLoadError(f"--quant {quant_choice} packs the weights, which compute in "
                             f"bf16; --dtype {key} means dequantized weights: give one of them")
    if quant_choice in ("q4", "q8"):
        return WeightFormat(quant_choice)
    return WeightFormat("gguf") if has_quantized_matrices(source) else WeightFormat(
        DEFAULT_DTYPE if key == "auto" else key)


def nbytes(m: Matrix | None) -> int:
    """Resident bytes of a float or packed matrix (0 for None)."""
    if m is None:
        return 0
    if isinstance(m, torch.Tensor):
        return m.numel() * m.element_size()
    return int(m.nbytes)


def concat(parts: list[Matrix]) -> Matrix:
    """Matrices with the same input width stacked by rows (q, k, v; gate, up)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts).contiguous()  # type: ignore[arg-type]
    packed = [quant.quantize(p, "int8") if isinstance(p, torch.Tensor) else p for p in parts]
    return quant.concat_rows(packed)


def head_rows(head: Matrix, rows: torch.Tensor) -> torch.Tensor:
    """float32 rows of the output head (the logits refined in float32)."""
    if isinstance(head, torch.Tensor):
        return head[rows].float()
    return head.dequantize(rows.numpy())


class Scattered:
    """Input columns `pos` of a packed matrix over whole 32-column blocks: the input is
    scattered into its blocks' positions (zeros elsewhere), so the result is exactly that of
    the same columns of the whole matrix."""

    kind = "scattered"

    def __init__(self, inner: quant.PackedWeight, pos: np.ndarray) -> None:
        self.inner, self.pos = inner, torch.from_numpy(np.asarray(pos, dtype=np.int64))
        self.out_features, self.in_features = inner.out_features, len(pos)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        xe = x.new_zeros(*x.shape[:-1], self.inner.in_features)
        xe[..., self.pos] = x
        return self.inner.linear(xe)

    def dequantize(self, rows: Any = None) -> torch.Tensor:
        return self.inner.dequantize(rows)[:, self.pos]

    @property
    def nbytes(self) -> int:
        return int(self.inner.nbytes) + 8 * len(self.pos)


class Weights:
    """A source's matrices in a format. `source`: a model source (GGUFModelFile,
    HFModelFolder) or, for float formats, a bare TensorSource function. partial: float
    matrices are read by rows/columns from the file (a group's only, as the loader reads);
    else from whole tensors (cached: building many shards of a layer)."""

    def __init__(self, source: Any, fmt: WeightFormat, partial: bool = False) -> None:
        self.format = fmt
        bare = callable(source) and not hasattr(source, "tensor")
        self.source = None if bare else source
        self.tensor = cached(source if bare else source.tensor)
        self.partial = partial and not bare and hasattr(source, "rows")
        self._gguf = not bare and hasattr(source, "_tensors")
        if fmt.packed and bare:
            raise ModelLoadError("packed weights need a model source, not a tensor function")

    def qtype(self, name: str) -> str:
        return "F32" if self.source is None else self.source.tensor_type(name)

    def layout(self, name: str) -> str | None:
        """The packed layout of matrix `name` in this format; None: kept float."""
        if not self.format.packed or (self.format.name == "gguf" and not self._gguf):
            return None
        return self.format.layout_for(self.qtype(name))

    def vector(self, name: str) -> torch.Tensor:
        """A float32 vector (norms, biases)."""
        return torch.from_numpy(self.tensor(name)).float()

    def _float(self, name: str, rows: np.ndarray | None, cols: np.ndarray | None,
               partial: bool = False) -> tuple[np.ndarray, int]:
        if (self.partial or partial) and (rows is not None or cols is not None):
            if rows is not None:
                return self.source.rows(name, rows)  # type: ignore[union-attr]
            return self.source.cols(name, cols)  # type: ignore[union-attr]
        w = self.tensor(name)
        if rows is not None:
            w = w[rows]
        if cols is not None:
            w = w[:, cols]
        return w, 0

    def rows(self, name: str, rows: np.ndarray | None = None) -> tuple[Matrix, int]:
        """Rows `rows` (default all) of a matrix and the file bytes read."""
        layout = self.layout(name)
        if layout is not None and rows is None:
            n = G.shape(self.source, name)[0] if self._gguf else (
                self.source.shape(name)[0] if hasattr(self.source, "shape") else None)
            if n is not None and n > PACK_CHUNK_ROWS:
                return self._rows_in_chunks(name, n)
        if layout is not None and self._gguf:
            return G.pack_rows(self.source, name, rows, layout)
        w, read = self._float(name, rows, None, partial=layout is not None)
        if layout is not None:
            return quant.quantize(w, layout), read
        return torch.from_numpy(np.ascontiguousarray(w)).to(self.format.float_dtype), read

    def _rows_in_chunks(self, name: str, n: int) -> tuple[Matrix, int]:
        """A large matrix packed PACK_CHUNK_ROWS rows at a time (bounds the float and int32
        transients of packing: the output head of a 49k vocabulary is 200 MB in float32)."""
        parts, read = [], 0
        for s in range(0, n, PACK_CHUNK_ROWS):
            part, r = self.rows(name, np.arange(s, min(s + PACK_CHUNK_ROWS, n)))
            parts.append(part)
            read += r
        return stack_rows(parts), read  # type: ignore[arg-type]

    def cols(self, name: str, cols: np.ndarray) -> tuple[Matrix, int]:
        """Input columns `cols` (in that order) of a matrix and the file bytes read; packed,
        the same values as those columns of the whole matrix except for a scattered set (more
        than SCATTER_LIMIT x its columns in whole blocks: requantized to int8 per row)."""
        cols = np.asarray(cols, dtype=np.int64)
        layout = self.layout(name)
        if layout is None:
            w, read = self._float(name, None, cols)
            return torch.from_numpy(np.ascontiguousarray(w)).to(self.format.float_dtype), read
        if layout == "int8":  # per-row scales: from the whole rows
            whole, read = self.rows(name)
            if np.array_equal(cols, np.arange(whole.in_features)):
                return whole, read
            return whole.columns(cols), read  # type: ignore[union-attr]
        if G.whole_groups(cols):
            if self._gguf:
                return G.pack_columns(self.source, name, cols, layout)
            w, read = self._float(name, None, cols)
            return quant.quantize(w, layout), read
        k = G.shape(self.source, name)[1] if self._gguf else self.tensor(name).shape[1]
        blocks = np.unique(cols // quant.GROUP)
        spread = (blocks[:, None] * quant.GROUP + np.arange(quant.GROUP)).reshape(-1)
        spread = spread[spread < k]
        if len(spread) > SCATTER_LIMIT * len(cols) or k % quant.GROUP:
            if self._gguf:
                return G.pack_columns(self.source, name, cols, layout, scattered="int8")
            w, read = self._float(name, None, cols)
            return quant.quantize(w, "int8"), read
        inner, read = self.cols(name, spread)
        return Scattered(inner, np.searchsorted(spread, cols)), read  # type: ignore[arg-type]

    def embedding(self, head: Matrix, tied: bool) -> Matrix | G.QuantEmbedding:
        """The embedding table: the head itself when tied; else the file's blocks (a
        quantized GGUF table), or the table in the format."""
        if tied:
            return head
        if self._gguf and self.format.name == "gguf" and self.qtype("embed") not in \
                G.FLOAT_TYPES:
            return G.QuantEmbedding.from_source(self.source)
        return self.rows("embed")[0]

    def unit_bytes(self, kind: str, config: Any) -> int:
        """Estimated resident bytes of one MLP neuron or one KV head (with its query heads)."""
        d = config.hidden_size

        def per_weight(leaf: str) -> float:
            name = f"layers.0.{leaf}"
            layout = self.layout(name) if self.source is not None else None
            if layout is None:
                return torch.finfo(self.format.float_dtype).bits / 8
            return _LAYOUT_BYTES[layout]

        if kind == "mlp":
            return int(d * sum(per_weight(n) for n in ("w_gate", "w_up", "w_down")) + 0.999)
        q, kv = config.q_per_kv * config.head_dim, config.head_dim
        size = torch.finfo(self.format.dtype).bits // 8
        bias = (q + 2 * kv) * size if config.attn_bias else 0
        return int(d * (q * (per_weight("wq") + per_weight("wo")) + kv * (
            per_weight("wk") + per_weight("wv"))) + 0.999) + bias


def stack_rows(parts: list[quant.PackedWeight]) -> quant.PackedWeight:
    """Packed row blocks of one kind stacked without unpacking (every part but the last a
    whole number of the int4 layout's row blocks)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, quant.Int4Weight):
        return quant.Int4Weight(torch.cat([p.packed for p in parts]),  # type: ignore[union-attr]
                                torch.cat([p.scale_zeros for p in parts], dim=1),  # type: ignore[union-attr]
                                sum(p.out_features for p in parts), first.in_features)
    if isinstance(first, quant.Int8Weight):
        return quant.Int8Weight(torch.cat([p.q for p in parts]),  # type: ignore[union-attr]
                                torch.cat([p.scale for p in parts]),  # type: ignore[union-attr]
                                first.in_features)
    if isinstance(first, quant.Int4PairWeight):
        return quant.Int4PairWeight(stack_rows([p.hi for p in parts]),  # type: ignore[union-attr]
                                    stack_rows([p.lo for p in parts]))  # type: ignore[union-attr]
    return quant.concat_rows(parts)


def as_weights(tensor: TensorSource | Weights, dtype: torch.dtype | None) -> Weights:
    """A Weights for a bare tensor function in a float dtype, or the Weights given."""
    if isinstance(tensor, Weights):
        return tensor
    if dtype is None:
        raise ValueError("a tensor function needs a float dtype")
    return Weights(tensor, WeightFormat.of_dtype(dtype))
