"""Tiny random LLaMA-family models, written as real GGUF files and Hugging Face folders.

They exercise the loaders on what the default model does not have (other tensor types, RoPE
scaling, biases, SentencePiece vocabularies); transformers is the reference for their logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HIDDEN, INTER, HEADS, KV, LAYERS, VOCAB = 256, 512, 4, 2, 2, 320


def hf_tiny(path: Path, arch: str = "llama", rope_scaling: dict | None = None,
            seed: int = 0, vocab: int = VOCAB):
    """A random tiny LlamaForCausalLM / Qwen2ForCausalLM saved as safetensors; returns it."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        extra = {"rope_scaling": rope_scaling} if rope_scaling else {}
        cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init so errors are visible in the logits
        for p in model.parameters():
            p.normal_(0, 0.08)
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(path)
    from halollm.model.tokenizer import Tokenizer

    Tokenizer.from_gguf_metadata(byte_vocab(vocab)).backend.save(str(path / "tokenizer.json"))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter layout for q/k rows (interleaved RoPE pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _fake_k_quant(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf cannot quantize K types)."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    # scales that keep weights around 0.05, like a real model's
    d = 1e-4 if qtype == "Q4_K" else 2e-5
    scale = np.full((blocks.shape[0], 1), d, dtype=np.float16).view(np.uint8)
    if qtype == "Q4_K":  # d, dmin at the start
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    elif qtype == "Q6_K":  # d at the end
        blocks[:, -2:] = scale
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, hf_model, qtype: str = "F32", arch: str = "llama",
               tokenizer: dict | None = None, rope_freqs: np.ndarray | None = None) -> None:
    """Write hf_model's weights as a GGUF file the way llama.cpp's converter lays them out.
    Matrices are stored as `qtype`; norms stay F32."""
    import gguf

    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tok = tokenizer or byte_vocab(cfg.vocab_size)
    for key, value in tok.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif value and isinstance(value[0], str):
            w.add_array(key, value)
        elif value and isinstance(value[0], float):
            w.add_array(key, [float(x) for x in value])
        else:
            w.add_array(key, [int(x) for x in value])
    rng = np.random.default_rng(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    leaf = {"input_layernorm.weight": "attn_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight":
            "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
            "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
            "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight"}
    qt = gguf.GGMLQuantizationType[qtype]
    for key, arr in sd.items():
        if key in names:
            name = names[key]
        else:
            _, _, i, rest = key.split(".", 3)
            name = f"blk.{i}.{leaf[rest]}"
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            arr = _permute(arr, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            arr = _permute(arr, cfg.num_key_value_heads)
        if arr.ndim == 1 or qtype == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif qtype in ("Q4_K", "Q6_K"):
            w.add_tensor(name, _fake_k_quant(arr.shape[0], arr.shape[1], qtype, rng),
                         raw_dtype=qt)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_vocab(vocab_size: int) -> dict:
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, specials, padding."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<s>", "</s>", *alphabet]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    tokens += [f"<pad{i}>" for i in range(vocab_size - len(tokens))]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 1}


def spm_vocab(model_file: Path) -> dict:
    """GGUF tokenizer metadata of a trained SentencePiece model (as llama.cpp writes it)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                     6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True}
