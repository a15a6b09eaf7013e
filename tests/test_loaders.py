"""Loaders on tiny random models: every GGUF tensor type, RoPE scaling, biases, SentencePiece."""

from __future__ import annotations

import pytest
import torch
import transformers

from halollm.errors import ModelLoadError
from halollm.model.loader import load_model
from tests.conftest import SHARED_DATA, TEXT_200
from tests.tiny import hf_tiny, spm_vocab, write_gguf

IDS = [5, 17, 200, 3, 99, 150, 42, 7, 260, 11, 64, 128, 31, 250, 8, 77] * 4


def _ours(path, ids=IDS):
    return load_model(path, "fp32").transformer.forward(ids, 0)


def _ref(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K",
                                   "Q6_K"])
def test_gguf_tensor_types_match_transformers(tmp_path, qtype):
    hf = hf_tiny(tmp_path / "hf")
    gguf_path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(gguf_path, hf, qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_path.name, dtype=torch.float32)
    ours = _ours(gguf_path)
    assert (ours - _ref(ref)).abs().max().item() <= 1e-4
    if qtype == "F32":  # the un-permuted q/k give back the original model itself
        assert (ours - _ref(hf)).abs().max().item() <= 1e-4


def test_hf_folder_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = hf_tiny(tmp_path, rope_scaling=scaling)
    model = load_model(tmp_path, "fp32")
    assert model.config.rope_scaling is not None
    ids = IDS * 3  # 192 positions: beyond the original context, where scaling matters
    assert (model.transformer.forward(ids, 0) - _ref(hf, ids)).abs().max().item() <= 1e-4


def test_gguf_llama3_rope_freqs_tensor(tmp_path):
    """llama.cpp stores llama3 scaling as per-frequency divisors (tensor rope_freqs)."""
    from halollm.model.llama import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = hf_tiny(tmp_path / "hf", rope_scaling=scaling)
    cfg = load_model(tmp_path / "hf", "fp32").config
    plain = rope_inv_freq(cfg.__class__(**{**cfg.to_dict(), "rope_scaling": None}))
    factors = (plain / rope_inv_freq(cfg)).numpy()
    write_gguf(tmp_path / "t.gguf", hf, "F32", rope_freqs=factors)
    ids = IDS * 3
    assert (_ours(tmp_path / "t.gguf", ids) - _ref(hf, ids)).abs().max().item() <= 1e-4


def test_qwen2_biases_hf_and_gguf(tmp_path):
    hf = hf_tiny(tmp_path / "hf", arch="qwen2")
    model = load_model(tmp_path / "hf", "fp32")
    assert model.config.attn_bias
    assert (model.transformer.forward(IDS, 0) - _ref(hf)).abs().max().item() <= 1e-4
    write_gguf(tmp_path / "q.gguf", hf, "F32", arch="qwen2")
    assert (_ours(tmp_path / "q.gguf") - _ref(hf)).abs().max().item() <= 1e-4


def test_sentencepiece_gguf_tokenizer_matches_sentencepiece(tmp_path):
    import sentencepiece as spm

    book = SHARED_DATA / "calibration" / "alice_in_wonderland.pg11.body.txt"
    assert book.is_file(), f"no calibration text at {book} (set HALO_DATA to ../shared/data)"
    spm.SentencePieceTrainer.train(
        input=str(book), model_prefix=str(tmp_path / "sp"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, bos_id=1, eos_id=2, unk_id=0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as LLaMA's
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    hf = hf_tiny(tmp_path / "hf", vocab=sp.get_piece_size())
    write_gguf(tmp_path / "spm.gguf", hf, "F32", tokenizer=spm_vocab(tmp_path / "sp.model"))
    tok = load_model(tmp_path / "spm.gguf", "fp32").tokenizer
    texts = [TEXT_200, "Alice was beginning to get very tired", "  two  spaces\nnew line",
             "digits 12345 and café, 日本 😀 (byte fallback)", "Hello", "a"]
    for text in texts:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode("Hello")[0] == sp.bos_id()  # llama-type vocabularies add BOS


def test_bad_models_give_clear_errors(tmp_path):
    import gguf

    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.gguf")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file or a Hugging Face"):
        load_model(text)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    hf = hf_tiny(tmp_path / "hf")
    good = tmp_path / "good.gguf"
    write_gguf(good, hf, "F32")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError):
        load_model(truncated)
    gpt2 = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(gpt2), arch="gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported"):
        load_model(gpt2)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(good, "fp8")


def test_unsupported_tensor_type_is_refused(tmp_path):
    import gguf
    import numpy as np

    hf = hf_tiny(tmp_path / "hf")
    path = tmp_path / "iq.gguf"
    write_gguf(path, hf, "F32")
    # rewrite with one matrix in an i-quant type we do not dequantize
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), arch="llama")
    for key, field in r.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        w.add_key_value(key, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    iq = gguf.GGMLQuantizationType.IQ4_NL
    block, size = gguf.GGML_QUANT_SIZES[iq]
    for t in r.tensors:
        if t.name == "blk.0.ffn_up.weight":
            rows, cols = int(t.shape[1]), int(t.shape[0])
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=iq)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="IQ4_NL, which is not supported"):
        load_model(tmp_path / "iq2.gguf")


def _gguf_reader_view(path):
    """What the `gguf` package's own reader makes of a file: metadata and tensors."""
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in r.fields.items():
        try:
            meta[key] = field.contents()
        except UnicodeDecodeError:
            continue
    return ({k: v for k, v in meta.items() if not k.startswith("GGUF.")},
            {t.name: t for t in r.tensors})


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_K", "default"])
def test_gguf_walk_reads_what_the_gguf_package_reads(tmp_path, qtype):
    """HALO's bounded GGUF walk (20x faster than gguf.GGUFReader on the default model's
    vocabulary) gives the same metadata, values and types, and the same tensor bytes."""
    import numpy as np

    from halollm.model.gguf_file import GGUFModelFile
    from halollm.model.loader import default_model_path

    if qtype == "default":
        path = default_model_path()
    else:
        path = tmp_path / f"tiny-{qtype}.gguf"
        write_gguf(path, hf_tiny(tmp_path / "hf"), qtype)
    meta, tensors = _gguf_reader_view(path)
    ours = GGUFModelFile(path)
    assert ours.metadata.keys() == meta.keys()
    for key, value in meta.items():
        assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
    assert ours._raw.keys() == tensors.keys()
    for name, t in tensors.items():
        mine = ours._raw[name]
        assert mine.shape == tuple(int(d) for d in t.shape) and mine.tensor_type == t.tensor_type
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape, name
        assert np.array_equal(mine.data, np.asarray(t.data)), name
