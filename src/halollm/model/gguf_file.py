"""Read a LLaMA-family GGUF file (memory-mapped) into HALO's canonical weight names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from halollm.errors import ModelLoadError
from halollm.model.config import ModelConfig, RopeScaling

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
        import gguf  # heavy import, deferred

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as exc:  # gguf raises ValueError/struct.error/etc. on bad files
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception:  # unusual field types: keep going, we only need known keys
                continue
        self.arch = str(self.metadata.get("general.architecture", ""))
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{self.path}: architecture '{self.arch}' is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
        self._raw = {t.name: t for t in self._reader.tensors}
        self._tensors = {}
        for t in self._reader.tensors:
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

    def _read_config(self) -> ModelConfig:
        embed = self._tensors.get("embed")
        if embed is None:
            raise ModelLoadError(f"{self.path}: no token_embd.weight tensor")
        hidden = int(self._meta("embedding_length"))
        n_heads = int(self._meta("attention.head_count"))
        n_kv = int(self._meta("attention.head_count_kv", n_heads))
        head_dim = int(self._meta("attention.key_length", hidden // n_heads))
        vocab = int(self._meta("vocab_size", int(embed.shape[1])))
        scaling = None
        if self._meta("rope.scaling.type") == "llama3" and self._meta("rope.scaling.factor"):
            scaling = RopeScaling(
                factor=float(self._meta("rope.scaling.factor")),
                low_freq_factor=float(self._meta("rope.scaling.low_freq_factor", 1.0)),
                high_freq_factor=float(self._meta("rope.scaling.high_freq_factor", 4.0)),
                original_max_position=int(self._meta("rope.scaling.original_context_length",
                                                     8192)))
        factors = None
        freqs = self._raw.get("rope_freqs.weight")
        if scaling is None and freqs is not None:  # llama.cpp's llama3 scaling: divisors
            factors = tuple(float(x) for x in np.asarray(freqs.data, dtype=np.float32))
            if len(factors) != head_dim // 2:
                raise ModelLoadError(f"{self.path}: rope_freqs has {len(factors)} values, "
                                     f"expected {head_dim // 2}")
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._meta("feed_forward_length")),
            n_layers=int(self._meta("block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rope_theta=float(self._meta("rope.freq_base", 10000.0)),
            rms_eps=float(self._meta("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(self._meta("context_length", 4096)),
            tie_embeddings="lm_head" not in self._tensors,
            attn_bias="layers.0.bq" in self._tensors,
            rope_scaling=scaling,
            rope_freq_factors=factors,
            architecture=self.arch,
            name=str(self.metadata.get("general.name", self.path.stem)),
        )

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
        mm = getattr(self._reader, "data", None)
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            try:
                mm._mmap.close()
            except (BufferError, ValueError):
                pass  # still referenced by a live view; the GC will close it
