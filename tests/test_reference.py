"""The engine is the real model: it matches transformers on the default model."""

from __future__ import annotations

import pytest
import torch

from halollm.generate import LocalDecoder, generate
from halollm.sampling import SamplingParams
from tests.conftest import TEXT_200

DIVERSE_TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces   \n\n\ttabs\tand\r\nnewlines\n",
    "Numbers: 0 7 42 1234567890 3.14159 -2e10 1,000,000 2026-11-27",
    "def f(x):\n    return {'a': [x**2 for x in range(10)]}  # code\n",
    "Accents: café naïve résumé Ångström façade Zürich São Paulo",
    "CJK: 日本語のテキスト 中文文本 한국어 텍스트",
    "Emoji: 😀👍🏽🚀 family: 👨‍👩‍👧‍👦 flags: 🇫🇷",
    "Special tokens: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "Mixed: Ελληνικά русский עברית العربية हिन्दी",
    "x" * 300 + " " + "ab" * 50,
    "",
]


@pytest.mark.parametrize("text", DIVERSE_TEXTS)
def test_tokenizer_ids_equal_reference(model_fp32, reference_tokenizer, text):
    ours = model_fp32.tokenizer.encode(text)
    ref = reference_tokenizer(text, add_special_tokens=True).input_ids
    assert ours == ref
    assert model_fp32.tokenizer.decode(ours, skip_special=False) == reference_tokenizer.decode(
        ref, skip_special_tokens=False)


def test_chat_template_equals_reference(model_fp32, reference_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    ours = model_fp32.tokenizer.render_chat(messages)
    ref = reference_tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
    assert ours == ref
    # without a system message the template inserts its default one
    assert "SmolLM" in model_fp32.tokenizer.render_chat([{"role": "user", "content": "hi"}])


def test_logits_match_transformers(model_fp32, reference):
    ids = model_fp32.tokenizer.encode(TEXT_200)
    assert 180 <= len(ids) <= 260
    ours = model_fp32.transformer.forward(ids, 0)
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-3, diff
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_32_tokens_equal_transformers_generate(model_fp32, reference):
    tok = model_fp32.tokenizer
    prompt = tok.encode(tok.render_chat([{"role": "user",
                                          "content": "Name three uses of a brick."}]))
    ours = generate(LocalDecoder(model_fp32.transformer), tok, prompt, max_tokens=32,
                    sampling=SamplingParams(temperature=0.0))
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ours.token_ids) == 32
    assert ours.token_ids == ref


def test_hf_safetensors_folder_gives_same_logits(model_fp32, reference, reference_tokenizer,
                                                 tmp_path):
    """A Hugging Face folder saved by transformers (sharded) loads and gives the same logits."""
    import transformers

    from halollm.model.loader import load_model

    # transformers will not re-save a GGUF-loaded model as such: copy its weights into a plain
    # LlamaForCausalLM and save that (sharded), as a user converting a model would.
    config = transformers.LlamaConfig.from_dict(
        {k: v for k, v in reference.config.to_dict().items() if k != "quantization_config"})
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(reference.state_dict())
    plain.save_pretrained(tmp_path, max_shard_size="200MB")
    reference_tokenizer.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) >= 2  # sharded
    hf = load_model(tmp_path, "fp32")
    assert hf.config.n_layers == model_fp32.config.n_layers
    ids = model_fp32.tokenizer.encode(TEXT_200)[:64]
    assert hf.tokenizer.encode(TEXT_200)[:64] == ids
    a = hf.transformer.forward(ids, 0)
    b = model_fp32.transformer.forward(ids, 0)
    assert (a - b).abs().max().item() <= 1e-4
    assert hf.tokenizer.eos_ids == model_fp32.tokenizer.eos_ids
    assert hf.tokenizer.render_chat([{"role": "user", "content": "x"}]) == \
        model_fp32.tokenizer.render_chat([{"role": "user", "content": "x"}])
