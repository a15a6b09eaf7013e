"""`halo make-model` writes a Hugging Face folder that other tools read as what it says:
transformers loads it as a LLaMA model whose logits match HALO's on the same weights, and it
carries the fields that converters (distributed-llama's, llama.cpp's) require."""

import json

import torch

from halollm.model.loader import load_model
from halollm.model.random_model import Shape, write_random_model


def test_make_model_folder_is_a_llama_that_transformers_reads(tmp_path):
    import transformers

    shape = Shape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=49152)
    n = write_random_model(tmp_path, shape, seed=3)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_act"] == "silu" and config["model_type"] == "llama"
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"

    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert sum(p.numel() for p in ref.parameters() if p.dim() == 2) == n  # norms aside
    ours = load_model(tmp_path, "fp32")
    ids = ours.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = ours.transformer.forward(ids, 0)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item() + 1e-5
