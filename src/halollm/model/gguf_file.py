"""Read a LLaMA-family GGUF file (memory-mapped) into HALO's canonical weight names."""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from halollm.errors import ModelLoadError
from halollm.model.config import ModelConfig, RopeScaling
from halollm.model.gguf_walk import read_gguf

# GGUF architectures we run, and whether llama.cpp's converter permuted q/k rows for its
# interleaved RoPE layout (it does for "llama"; qwen2 already uses the NeoX/HF layout).
SUPPORTED_ARCHS = {"llama": True, "qwen2": False}

# Tensor types we can turn into float32 (gguf's numpy dequantizers).
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "norm",
                 "output.weight": "lm_head"}
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "ffn_norm.weight": "mlp_norm",
    "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo", "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
    "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
}


_REQUIRED = object()


def canonical_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'layers.3.wq'; None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation so rows follow the Hugging Face RoPE layout."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFModelFile:
    """A GGUF model: config, tokenizer metadata and lazily dequantized tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            if size < 24:
                raise ModelLoadError(f"{self.path}: not a GGUF file ({size} bytes)")
            with self.path.open("rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot read ({exc.strerror or exc})") from exc
        self.metadata, tensors = read_gguf(self.path, self._map)
        self.arch = str(self.metadata.get("general.architecture", ""))
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{self.path}: architecture '{self.arch}' is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
        self._raw = {t.name: t for t in tensors}
        self._tensors = {}
        for t in tensors:
            name = canonical_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.config = self._read_config()
        for t in self._tensors.values():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ModelLoadError(
                    f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which is not "
                    f"supported (supported: {', '.join(sorted(SUPPORTED_TYPES))})")

    def _meta(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def _number(self, key: str, default: Any = _REQUIRED, kind: type = int) -> Any:
        """A positive metadata number (an int, or a finite float for kind=float): missing,
        zero, negative or of the wrong type is one clear error naming the key."""
        full = f"{self.arch}.{key}"
        value = self.metadata.get(full)
        if value is None:
            if default is _REQUIRED:
                raise ModelLoadError(f"{self.path}: model file lacks {full}")
            return default
        ok = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
        if isinstance(value, bool) or not isinstance(value, ok):
            raise ModelLoadError(f"{self.path}: model file has {full} = {value!r}; expected "
                                 f"a positive {'whole ' if kind is int else ''}number")
        if not (math.isfinite(value) and value > 0):
            raise ModelLoadError(f"{self.path}: model file has {full} = {value}; it must be "
                                 "positive")
        return kind(value)

    def _rope(self, head_dim: int) -> tuple[RopeScaling | None, tuple[float, ...] | None]:
        scaling = None
        if self._meta("rope.scaling.type") == "llama3" and self._meta("rope.scaling.factor"):
            scaling = RopeScaling(
                factor=self._number("rope.scaling.factor", kind=float),
                low_freq_factor=self._number("rope.scaling.low_freq_factor", 1.0, float),
                high_freq_factor=self._number("rope.scaling.high_freq_factor", 4.0, float),
                original_max_position=self._number("rope.scaling.original_context_length",
                                                   8192))
        factors = None
        freqs = self._raw.get("rope_freqs.weight")
        if scaling is None and freqs is not None:  # llama.cpp's llama3 scaling: divisors
            factors = tuple(float(x) for x in np.asarray(freqs.data, dtype=np.float32))
            if len(factors) != head_dim // 2:
                raise ModelLoadError(f"{self.path}: rope_freqs has {len(factors)} values, "
                                     f"expected {head_dim // 2}")
        return scaling, factors

    def _read_config(self) -> ModelConfig:
        embed = self._tensors.get("embed")
        if embed is None:
            raise ModelLoadError(f"{self.path}: no token_embd.weight tensor")
        hidden = self._number("embedding_length")
        n_heads = self._number("attention.head_count")
        if len(embed.shape) != 2 or int(embed.shape[0]) != hidden:
            raise ModelLoadError(
                f"{self.path}: token_embd.weight has shape {[int(d) for d in embed.shape]}, "
                f"which does not match {self.arch}.embedding_length = {hidden}")
        head_dim = self._number("attention.key_length", max(hidden // n_heads, 1))
        scaling, factors = self._rope(head_dim)
        try:
            return ModelConfig(
                vocab_size=self._number("vocab_size", int(embed.shape[1])),
                hidden_size=hidden,
                intermediate_size=self._number("feed_forward_length"),
                n_layers=self._number("block_count"),
                n_heads=n_heads,
                n_kv_heads=self._number("attention.head_count_kv", n_heads),
                head_dim=head_dim,
                rope_theta=self._number("rope.freq_base", 10000.0, float),
                rms_eps=self._number("attention.layer_norm_rms_epsilon", 1e-5, float),
                max_position=self._number("context_length", 4096),
                tie_embeddings="lm_head" not in self._tensors,
                attn_bias="layers.0.bq" in self._tensors,
                rope_scaling=scaling,
                rope_freq_factors=factors,
                architecture=self.arch,
                name=str(self.metadata.get("general.name", self.path.stem)),
            )
        except ModelLoadError as exc:  # the config's own consistency checks
            raise ModelLoadError(f"{self.path}: {exc}") from exc

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """Dequantized float32 tensor in PyTorch layout ([out, in] for matrices)."""
        import gguf

        t = self._tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))
        w = np.asarray(data, dtype=np.float32).reshape(shape)
        if not w.flags.writeable:  # a view of the read-only map: copy so torch may own it
            w = w.copy()
        if SUPPORTED_ARCHS[self.arch]:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("wq", "bq"):
                w = unpermute_rows(w, self.config.n_heads)
            elif leaf in ("wk", "bk"):
                w = unpermute_rows(w, self.config.n_kv_heads)
        return w

    def rows(self, name: str, index: np.ndarray) -> tuple[np.ndarray, int]:
        """Rows `index` of a matrix (float32, PyTorch layout) and the file bytes read: only
        those rows' quantized blocks are touched. Rows of q/k must be whole heads."""
        import gguf

        t = self._tensors[name]
        raw = t.data[index]
        w = np.asarray(gguf.quants.dequantize(raw, t.tensor_type), dtype=np.float32)
        w = w.reshape(len(index), int(t.shape[0]))
        leaf = name.rsplit(".", 1)[-1]
        if SUPPORTED_ARCHS[self.arch] and leaf in ("wq", "wk"):
            w = unpermute_rows(w, len(index) // self.config.head_dim)
        return w, int(raw.nbytes)

    def cols(self, name: str, index: np.ndarray) -> tuple[np.ndarray, int]:
        """Columns `index` of a matrix (float32) and the file bytes read: in every row only
        the quantization blocks holding those columns (a block covers 32 or 256 columns)."""
        import gguf

        t = self._tensors[name]
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                             gguf.GGMLQuantizationType.BF16):
            raw = t.data[:, index]
            return np.asarray(gguf.quants.dequantize(raw, t.tensor_type),
                              dtype=np.float32), int(raw.nbytes)
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        q = t.data.reshape(t.data.shape[0], -1, block_bytes)
        blocks = np.unique(index // block)
        raw = np.ascontiguousarray(q[:, blocks]).reshape(q.shape[0], -1)
        w = np.asarray(gguf.quants.dequantize(raw, t.tensor_type), dtype=np.float32)
        where = np.searchsorted(blocks, index // block) * block + index % block
        w = np.ascontiguousarray(w[:, where])
        leaf = name.rsplit(".", 1)[-1]
        if SUPPORTED_ARCHS[self.arch] and leaf in ("wq", "wk"):
            n = self.config.n_heads if leaf == "wq" else self.config.n_kv_heads
            w = unpermute_rows(w, n)
        return w, int(raw.nbytes)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            pass  # still referenced by a live view; the GC will close it
