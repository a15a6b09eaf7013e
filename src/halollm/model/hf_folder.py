"""Read a Hugging Face model folder (config.json + *.safetensors, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from halollm.errors import ModelLoadError
from halollm.model.config import ModelConfig, RopeScaling

SUPPORTED_ARCHS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}

_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm",
                 "lm_head.weight": "lm_head"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}


def canonical_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"layers.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    return None


def _rope_scaling(cfg: dict[str, Any]) -> RopeScaling | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ModelLoadError(f"RoPE scaling type '{kind}' is not supported (only llama3)")
    return RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                       high_freq_factor=float(rs["high_freq_factor"]),
                       original_max_position=int(rs["original_max_position_embeddings"]))


def _rope_theta(cfg: dict[str, Any]) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


class HFModelFolder:
    """A Hugging Face folder: config and memory-mapped safetensors tensors."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{self.path}: no config.json (is this a model folder?)")
        try:
            self.raw_config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{cfg_path}: unreadable ({exc})") from exc
        archs = set(self.raw_config.get("architectures") or [])
        if not archs & SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{self.path}: architecture {sorted(archs) or '(none)'} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path}: no *.safetensors weight files")
        self._handles = []
        self._where: dict[str, tuple[Any, str]] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as exc:
                raise ModelLoadError(f"{f}: not a readable safetensors file ({exc})") from exc
            self._handles.append(h)
            for key in h.keys():
                name = canonical_name(key)
                if name is not None:
                    self._where[name] = (h, key)
        if "embed" not in self._where:
            raise ModelLoadError(f"{self.path}: no model.embed_tokens.weight tensor")
        self.config = self._read_config()

    def _read_config(self) -> ModelConfig:
        c = self.raw_config
        hidden = int(c["hidden_size"])
        n_heads = int(c["num_attention_heads"])
        tie = bool(c.get("tie_word_embeddings", False)) or "lm_head" not in self._where
        arch = "qwen2" if "Qwen2ForCausalLM" in c.get("architectures", []) else "llama"
        return ModelConfig(
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            head_dim=int(c.get("head_dim") or hidden // n_heads),
            rope_theta=_rope_theta(c),
            rms_eps=float(c.get("rms_norm_eps", 1e-5)),
            max_position=int(c.get("max_position_embeddings", 4096)),
            tie_embeddings=tie,
            attn_bias="layers.0.bq" in self._where,
            rope_scaling=_rope_scaling(c),
            architecture=arch,
            name=self.path.name,
        )

    def names(self) -> list[str]:
        return list(self._where)

    def tensor_type(self, name: str) -> str:
        h, key = self._where[name]
        return str(h.get_slice(key).get_dtype())

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""
        h, key = self._where[name]
        return tuple(int(d) for d in h.get_slice(key).get_shape())

    def tensor(self, name: str) -> np.ndarray:
        """Float32 copy of a tensor (safetensors maps the file; bf16/fp16 are widened)."""
        h, key = self._where[name]
        return h.get_tensor(key).float().numpy()

    def rows(self, name: str, index: np.ndarray) -> tuple[np.ndarray, int]:
        """Rows `index` of a matrix (float32) and the bytes read: one slice per run of
        consecutive rows, nothing else of the tensor is read."""
        h, key = self._where[name]
        sl = h.get_slice(key)
        parts = [sl[a:b] for a, b in _runs(index)]
        out = torch.cat(parts).float().numpy() if parts else np.zeros((0, 0), np.float32)
        return out, sum(p.numel() * p.element_size() for p in parts)

    def cols(self, name: str, index: np.ndarray) -> tuple[np.ndarray, int]:
        """Columns `index` of a matrix (float32) and the bytes read."""
        h, key = self._where[name]
        sl = h.get_slice(key)
        parts = [sl[:, a:b] for a, b in _runs(index)]
        out = torch.cat(parts, dim=1).float().numpy()
        return out, sum(p.numel() * p.element_size() for p in parts)

    def close(self) -> None:
        self._handles.clear()


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """Sorted-or-not indices -> [start, end) runs of consecutive values, in order."""
    out: list[tuple[int, int]] = []
    for i in (int(v) for v in index):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out
