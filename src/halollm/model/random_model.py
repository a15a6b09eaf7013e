"""LLaMA-shaped models with random weights, for speed and memory measurements at sizes the
default model does not have (their outputs mean nothing; accuracy needs real weights).

Written as a Hugging Face folder (config.json, one fp16 model.safetensors, and the default
model's tokenizer so that prompts work), tensor by tensor so that memory stays small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from halollm.errors import HaloError


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 49152

    def n_params(self) -> int:
        hd = self.hidden // self.heads
        attn = self.hidden * hd * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.intermediate) + \
            2 * self.vocab * self.hidden


# public model shapes (from their config.json files on the Hugging Face hub)
SHAPES = {
    "smollm2-360m": Shape(960, 2560, 32, 15, 5),
    "tinyllama-1.1b": Shape(2048, 5632, 22, 32, 4),
    "llama-3.2-1b": Shape(2048, 8192, 16, 32, 8),
}


def write_random_model(out: Path, shape: Shape, seed: int = 0) -> int:
    """Write the folder; returns the number of parameters."""
    from safetensors.torch import save_file

    from halollm.model.loader import open_source, open_tokenizer

    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise HaloError("hidden must be a multiple of heads, heads a multiple of kv-heads")
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    hd = shape.hidden // shape.heads
    tensors: dict[str, torch.Tensor] = {}

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * 0.02).half()

    tensors["model.embed_tokens.weight"] = rand(shape.vocab, shape.hidden)
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rand(shape.heads * hd, shape.hidden)
        tensors[p + "self_attn.k_proj.weight"] = rand(shape.kv_heads * hd, shape.hidden)
        tensors[p + "self_attn.v_proj.weight"] = rand(shape.kv_heads * hd, shape.hidden)
        tensors[p + "self_attn.o_proj.weight"] = rand(shape.hidden, shape.heads * hd)
        tensors[p + "mlp.gate_proj.weight"] = rand(shape.intermediate, shape.hidden)
        tensors[p + "mlp.up_proj.weight"] = rand(shape.intermediate, shape.hidden)
        tensors[p + "mlp.down_proj.weight"] = rand(shape.hidden, shape.intermediate)
        tensors[p + "input_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.half)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(shape.hidden,
                                                                    dtype=torch.half)
    tensors["model.norm.weight"] = torch.ones(shape.hidden, dtype=torch.half)
    tensors["lm_head.weight"] = rand(shape.vocab, shape.hidden)
    try:
        save_file(tensors, str(out / "model.safetensors"))
        tok = open_tokenizer(open_source(None))
        tok.backend.save(str(out / "tokenizer.json"))
        (out / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "float16",
            "bos_token_id": tok.bos_id, "eos_token_id": sorted(tok.eos_ids)}, indent=2))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": tok.chat_template, "add_bos_token": tok.add_bos,
             "tokenizer_class": "PreTrainedTokenizerFast"}))  # what converters (dllama's) read
    except OSError as exc:
        raise HaloError(f"cannot write the model to {out}: {exc.strerror or exc}") from exc
    return shape.n_params()
