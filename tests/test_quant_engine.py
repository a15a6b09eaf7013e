"""Packed quantized weights wired into the engine, the loader and the runtime (issue 15):
the packed model against the dequantized reference on the same weights, group slices of
packed tensors against the whole, the loader's packed store, strict cluster = single device
on the packed path, the formats chosen by --dtype / --quant, and the reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from halollm.errors import ModelLoadError
from halollm.generate import LocalDecoder, generate
from halollm.groups import GroupId, Partition
from halollm.loader.streamed import StreamedDecoder
from halollm.model import quant as Q
from halollm.model.formats import Scattered, WeightFormat, Weights, resolve_format
from halollm.model.llama import MlpShard, Transformer, sum_partials
from halollm.model.loader import load_model, open_source, open_tokenizer
from halollm.sampling import SamplingParams
from tests.conftest import TEXT_200, run_halo

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The three most useful things to pack for a long hike are"
PACKED = WeightFormat("gguf")


@pytest.fixture(scope="module")
def source():
    src = open_source(None)
    yield src
    src.close()


@pytest.fixture(scope="module")
def packed():
    return load_model(None, None)


def _dequantized_copy(t: Transformer) -> Transformer:
    """The same model with every packed matrix replaced by its dequantized float32 values:
    the reference the packed kernels must match (up to their bf16 activations)."""
    import copy

    ref = copy.copy(t)
    ref.dtype = torch.float32
    ref.lm_head = t.lm_head.dequantize()
    ref.embed_table = ref.lm_head
    ref.layers = []
    for layer in t.layers:
        new = copy.copy(layer)
        new.dtype = torch.float32
        new.attn, new.mlp = [], []
        for s in layer.attn:
            a = copy.copy(s)
            a.w_qkv, a.w_o = s.w_qkv.dequantize(), s.w_o.dequantize()
            a.cache = type(s.cache)(s.n_kv, s.head_dim)
            new.attn.append(a)
        for m in layer.mlp:
            new.mlp.append(MlpShard.of(m.neurons, m.w_gate_up.dequantize(), m.w_down.dequantize()))
        ref.layers.append(new)
    return ref


def _compare(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return (float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            float((lp.exp() * (lp - lq)).sum(-1).mean()))


def test_the_default_is_packed_and_a_quarter_of_fp16(packed, source):
    assert packed.format.name == "gguf" and packed.dtype == torch.bfloat16
    layer = packed.transformer.layers[3]
    assert isinstance(layer.mlp[0].w_gate_up, Q.Int4Weight)  # Q4_1 stays 4-bit
    assert isinstance(packed.transformer.lm_head, Q.Int4PairWeight)  # Q8_0: exact 8-bit
    gguf_bytes = sum(source._tensors[n].data.nbytes for n in source.names())
    assert packed.weight_bytes <= 1.15 * gguf_bytes
    fp16_bytes = 2 * packed.config.n_params()
    assert packed.weight_bytes < 0.4 * fp16_bytes


def test_packed_model_matches_its_dequantized_weights(packed, model_fp32):
    """Whole model, one prefill and the decode path: the packed kernels against float32 math
    on the very same (dequantized) weights; and against the fp32 engine."""
    ids = packed.tokenizer.encode(TEXT_200)
    with torch.inference_mode():
        got = packed.transformer.forward(ids)
        ref = _dequantized_copy(packed.transformer).forward(ids)
        fp32 = model_fp32.transformer.forward(ids)
    agree, kl = _compare(ref, got)
    assert agree >= 0.97 and kl < 2e-3  # bf16 activations only
    agree32, kl32 = _compare(fp32, got)
    assert agree32 >= 0.95 and kl32 < 3e-3
    dec = teacher_top1 = None
    dec = LocalDecoder(packed.transformer)
    teacher_top1 = torch.stack([dec.forward_last([t], i) for i, t in enumerate(ids[:40])])
    assert (teacher_top1.argmax(-1) == got[:40].argmax(-1)).float().mean() >= 0.95


def test_group_rows_and_columns_equal_those_of_the_whole(source):
    """A group sliced from a packed tensor (rows; whole column blocks; unaligned columns kept
    as whole blocks) has exactly the values of the same rows/columns of the whole."""
    w = Weights(source, PACKED, partial=True)
    name = "layers.2.w_down"
    whole, read_all = w.rows(name)
    ref = whole.dequantize()
    rows = np.array([5, 77, 3, 400, 575])
    part, read = w.rows(name, rows)
    assert torch.equal(part.dequantize(), ref[torch.from_numpy(rows)])
    assert read == len(rows) * read_all // whole.out_features  # only those rows' blocks
    aligned = np.arange(96, 192)
    cut, read = w.cols(name, aligned)
    assert isinstance(cut, Q.Int4Weight) and read < read_all / 10
    assert torch.equal(cut.dequantize(), ref[:, aligned])
    unaligned = np.arange(100, 276)  # a contiguous group not on 32-column boundaries
    spread, _ = w.cols(name, unaligned)
    assert isinstance(spread, Scattered)
    assert torch.equal(spread.dequantize(), ref[:, unaligned])
    x = torch.randn(2, len(unaligned))
    full_x = torch.zeros(2, whole.in_features)
    full_x[:, unaligned] = x
    assert torch.allclose(spread.linear(x).float(), whole.linear(full_x).float(), rtol=0.02,
                          atol=0.02)
    q, _ = w.rows("layers.2.wq", np.arange(64, 128))  # q rows through llama.cpp's permutation
    assert torch.equal(q.dequantize(), w.rows("layers.2.wq")[0].dequantize()[64:128])


def test_split_mlp_on_packed_groups_sums_to_the_whole(source):
    w = Weights(source, PACKED, partial=True)
    cfg = source.config
    whole = MlpShard(cfg, 4, range(cfg.intermediate_size), w)
    parts = [MlpShard(cfg, 4, g, w) for g in Partition.contiguous(cfg, 1, 7).layers[4].mlp]
    x = torch.randn(3, cfg.hidden_size).bfloat16()
    got = sum_partials([p.forward(x) for p in parts])
    ref = whole.forward(x).float()
    assert float((got - ref).norm() / ref.norm()) < 1e-2  # bf16 rounding of partials


def test_loader_stores_and_serves_packed_groups(source):
    tok = open_tokenizer(source)
    ids = tok.encode(PROMPT)
    full = StreamedDecoder(source, PACKED, "100%", mlp_groups=4)  # a group: part of a layer
    try:
        full_tokens = generate(full, tok, ids, max_tokens=8, sampling=GREEDY,
                               ignore_eos=True).token_ids
    finally:
        full.close()
    dec = StreamedDecoder(source, PACKED, "25%", mlp_groups=4)
    try:
        res = generate(dec, tok, ids, max_tokens=8, sampling=GREEDY, ignore_eos=True)
        stats = dec.loader_json()
        resident = list(dec.store.resident.items())
        g = GroupId(0, "mlp", 0)
        read = dec.store._load(g)
    finally:
        dec.close()
    assert res.token_ids == full_tokens
    assert stats["weights"] == "gguf" and stats["misses"] > 0
    assert resident and all(not isinstance(m, torch.Tensor)
                            for _, gw in resident for m in gw.tensors if m is not None)
    for gid, gw in resident:  # the store's estimate is the packed size
        assert gw.nbytes <= 1.1 * dec.store.sizes[gid]
    units = dec.partition.units(g)
    q41_row = 20 * source.config.hidden_size // 32  # bytes of one Q4_1 row of gate/up
    assert read.file_bytes >= 2 * len(units) * q41_row
    assert read.file_bytes < 0.5 * sum(source._tensors[f"layers.0.{n}"].data.nbytes
                                       for n in ("w_gate", "w_up", "w_down"))
    assert stats["model_group_bytes"] < 0.4 * 3 * 2 * source.config.hidden_size * \
        source.config.intermediate_size * source.config.n_layers * 2


def test_formats_of_dtype_and_quant(source, tmp_path):
    assert resolve_format(source).name == "gguf"
    assert resolve_format(source, "auto").name == "gguf"
    assert resolve_format(source, "fp32").name == "fp32"  # an explicit dtype dequantizes
    assert resolve_format(source, "half").name == "fp16"
    assert resolve_format(source, None, "none").name == "fp16"
    assert resolve_format(source, "fp32", "none").name == "fp32"
    assert resolve_format(source, None, "q8").name == "q8"
    assert resolve_format(source, "bf16", "q4").name == "q4"
    with pytest.raises(ModelLoadError, match="--dtype fp16 means dequantized"):
        resolve_format(source, "fp16", "q4")


@pytest.mark.parametrize("quant,weight_error", [("q8", 0.01), ("q4", 0.1)])
def test_float_models_are_packed_on_request(tmp_path, quant, weight_error):
    from tests.tiny import hf_tiny

    hf_tiny(tmp_path)
    assert load_model(tmp_path).format.name == "fp16"  # a float model: quantized on request
    ref = load_model(tmp_path, "fp32")
    q = load_model(tmp_path, quant=quant)
    assert q.format.name == quant
    pairs = [(q.transformer.layers[0].mlp[0].w_down, ref.transformer.layers[0].mlp[0].w_down),
             (q.transformer.lm_head, ref.transformer.lm_head),
             (q.transformer.embed_table, ref.transformer.embed_table)]
    for packed_w, float_w in pairs:
        assert isinstance(packed_w, Q.Int8Weight if quant == "q8" else Q.Int4Weight)
        err = (packed_w.dequantize() - float_w).norm() / float_w.norm()
        assert err < weight_error  # per-row int8 / per-32-group int4 on random weights
    assert q.weight_bytes < (0.2 if quant == "q4" else 0.3) * ref.weight_bytes
    ids = list(range(3, 40))
    with torch.inference_mode():
        a, b = ref.transformer.forward(ids), q.transformer.forward(ids)
    if quant == "q8":  # bf16 activations (~1.6% here) and 8-bit weights
        assert float((a - b).norm() / a.norm()) < 0.08


def test_generate_json_reports_weight_bytes_and_peak_rss():
    packed = run_halo("generate", "Hi", "--max-tokens", "3", "--json")
    fp32 = run_halo("generate", "Hi", "--max-tokens", "3", "--dtype", "fp32", "--json")
    assert packed.returncode == 0 and fp32.returncode == 0, packed.stderr + fp32.stderr
    p, f = json.loads(packed.stdout), json.loads(fp32.stdout)
    assert p["weights"] == "gguf" and f["weights"] == "fp32"
    assert 0 < p["weight_bytes"] < 0.25 * f["weight_bytes"]
    assert p["peak_rss_bytes"] > p["weight_bytes"] and f["peak_rss_bytes"] > f["weight_bytes"]
    assert p["peak_rss_bytes"] < f["peak_rss_bytes"]
    bad = run_halo("generate", "Hi", "--quant", "q4", "--dtype", "fp16")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--quant" in bad.stderr


@pytest.mark.slow
def test_strict_cluster_equals_single_device_on_packed_weights(packed):
    """The packed path on every device: a strict cluster (workers holding attention and MLP
    groups) gives the single device's greedy tokens; workers report their packed bytes."""
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.keys import cluster_key
    from halollm.runtime.local import LocalWorkers
    from halollm.runtime.options import ClusterOptions

    key = "test-cluster-key"
    tok = packed.tokenizer
    ids = tok.encode(PROMPT)
    ref = generate(LocalDecoder(packed.transformer), tok, ids, max_tokens=24,
                   sampling=GREEDY).token_ids
    with LocalWorkers(2, key, threads=1) as lw:
        coord = Coordinator(None, None, lw.addresses, cluster_key(key), ClusterOptions.build(
            mode="strict", attn_groups=3, coordinator_share=0.5, predictor=None))
        try:
            assert coord.format.name == "gguf"
            result = generate(coord, coord.tokenizer, ids, max_tokens=24, sampling=GREEDY,
                              ignore_eos=True)
            sync = coord.sync_json()
        finally:
            coord.close()
    assert result.token_ids[:len(ref)] == ref
    assert sync["received"] == sync["expected"] > 0
    reported = [w["reported"] for w in sync["workers"]]
    assert all(r["weights"] == "gguf" and r["weight_bytes"] > 0 and r["peak_rss_bytes"] > 0
               for r in reported)
    assert sum(r["weight_bytes"] for r in reported) < packed.weight_bytes
