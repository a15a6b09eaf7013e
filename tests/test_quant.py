"""Packed weights (halollm.model.quant, quant_gguf): kernels, GGUF conversions, slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halollm.model import quant as Q
from halollm.model import quant_gguf as G
from halollm.model.quant_bench import F16_FIELDS, random_blocks, rel_error

# Float rounding of the kernels: bf16 activations and outputs, bf16 scales (docs/quant.md).
KERNEL_REL = 4e-3  # relative RMS of an output against float math on the same packed values
SCALE_REL = 3e-3  # relative RMS of exact-type weights against gguf's dequantized values
# Weight error of each lossy (type, layout) on random blocks: measured x ~1.3 (docs/quant.md).
LOSSY_REL = {"int4": 0.1, "int8": 0.01, "int4x2": 0.006}


def _x(k: int, t: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, k, generator=torch.Generator().manual_seed(seed))


def _check_output(p: Q.PackedWeight, w_ref: torch.Tensor, rel_w: float) -> None:
    """p.linear(x) equals float math on p's own values to kernel rounding, and float math on
    the reference weights to that plus the weights' error."""
    x = _x(p.in_features)
    y = p.linear(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, p.out_features)
    own = x.bfloat16().float() @ p.dequantize().T
    assert rel_error(y, own) < KERNEL_REL
    assert rel_error(y, x @ w_ref.T) < KERNEL_REL + 1.5 * rel_w


def test_int4_layout_matches_the_packing_op():
    """The layout derived from the probe reproduces the op's packing of other shapes, so
    unpacking (rows, values, dequantize) reads the right nibbles."""
    lay = Q.int4_layout()
    rng = np.random.default_rng(1)
    n, k = 3 * lay.block_n, 96
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    w = Q.Int4Weight.from_values(q, np.ones((n, 3), np.float32), np.zeros((n, 3), np.float32))
    assert np.array_equal(w.values()[0], q)
    assert np.array_equal(w.values([5, 0, n - 1])[0], q[[5, 0, n - 1]])


def test_q4_0_nibble_order_and_scale():
    """A Q4_0 block whose element j has low nibble j and element 16+j high nibble 15-j:
    a one-hot input picks exactly w[:, j] = d * (q - 8) (a swapped order or a wrong zero
    point would give other values)."""
    d = np.float16(0.5)
    qs = (np.arange(16) | ((15 - np.arange(16)) << 4)).astype(np.uint8)
    block = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), qs])
    raw = np.tile(block, (32, 1))  # 32 rows, one block each
    p = G.pack_raw(raw, "Q4_0", 32)
    expect = 0.5 * (np.r_[np.arange(16), 15 - np.arange(16)] - 8)
    assert np.array_equal(p.dequantize()[0].numpy(), expect)
    for j in (0, 1, 15, 16, 31):
        x = torch.zeros(1, 32)
        x[0, j] = 1
        assert torch.equal(p.linear(x)[0].float(), torch.full((32,), float(expect[j])))


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS))
def test_every_gguf_type_packs_to_its_default_layout(qtype):
    """Random blocks of each type (every quantized value random): the packed weight equals
    gguf's dequantization (exact types: to bf16 scale rounding; lossy types: within the
    measured requantization error), and its matmul equals float math on the same values."""
    n, k = 48, 512  # 48 rows: not a multiple of the int4 block, so padding is exercised
    raw = random_blocks(qtype, n, k, np.random.default_rng(2))
    ref = torch.from_numpy(G.dequantize_raw(raw, qtype, k))
    p = G.pack_raw(raw, qtype, k)
    assert (p.out_features, p.in_features) == (n, k)
    err = rel_error(p.dequantize(), ref)
    bound = SCALE_REL if G.is_exact(qtype) else LOSSY_REL[G.DEFAULT_LAYOUT[qtype]]
    assert err < bound, (qtype, err)
    _check_output(p, ref, err)


@pytest.mark.parametrize("layout", ["int4", "int8", "int4x2"])
@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_K", "Q8_0"])
def test_any_layout_on_request(qtype, layout):
    raw = random_blocks(qtype, 64, 256, np.random.default_rng(3))
    ref = torch.from_numpy(G.dequantize_raw(raw, qtype, 256))
    p = G.pack_raw(raw, qtype, 256, layout)
    err = rel_error(p.dequantize(), ref)
    assert err < (SCALE_REL if G.is_exact(qtype, layout) else LOSSY_REL[layout])
    _check_output(p, ref, err)


def test_floats_are_packed_only_on_request():
    w = np.random.default_rng(4).standard_normal((40, 72)).astype(np.float32)
    with pytest.raises(ValueError, match="only on request"):
        G.pack_raw(w, "F32", 72)
    for layout, bound in (("q4", 0.1), ("q8", 0.01), ("int4x2", 0.006)):
        p = G.pack_raw(w, "F32", 72, layout)  # 72 columns: int4 pads to 96, int8 to 80
        assert p.in_features == 72
        err = rel_error(p.dequantize(), torch.from_numpy(w))
        assert err < bound
        _check_output(p, torch.from_numpy(w), err)


def test_wrong_input_width_is_refused_not_a_crash():
    p = Q.quantize(np.ones((32, 64), np.float32), "int8")
    with pytest.raises(ValueError, match="64"):
        p.linear(torch.ones(1, 63))


@pytest.mark.parametrize("layout", ["int4", "int8", "int4x2"])
def test_row_and_column_slices_equal_the_whole(layout):
    """rows(idx) (any rows, any order) and column_blocks(b) hold exactly the whole matrix's
    values there, and compute the same outputs."""
    w = np.random.default_rng(5).standard_normal((100, 256)).astype(np.float32)
    whole = Q.quantize(w, layout)
    full = whole.dequantize()
    idx = [99, 3, 4, 64, 0, 31, 32]
    part = whole.rows(idx)
    assert torch.equal(part.dequantize(), full[idx])
    x = _x(256)
    assert torch.equal(part.linear(x), whole.linear(x)[:, idx])
    blocks = [5, 0, 2]
    cols = np.concatenate([np.arange(b * 32, b * 32 + 32) for b in blocks])
    sub = whole.column_blocks(blocks)
    assert torch.equal(sub.dequantize(), full[:, cols])
    assert rel_error(sub.linear(x[:, cols]), x[:, cols].bfloat16().float() @ full[:, cols].T
                     ) < KERNEL_REL


def test_int8_columns_are_exact_for_any_set():
    whole = Q.quantize(np.random.default_rng(6).standard_normal((40, 300)), "int8")
    cols = [299, 7, 8, 150, 3]  # 5 columns: padded to 8 for the kernel
    sub = whole.columns(cols)
    assert torch.equal(sub.dequantize(), whole.dequantize()[:, cols])
    _check_output(sub, whole.dequantize()[:, cols], 0.0)


def test_concat_rows_same_and_mixed_kinds():
    rng = np.random.default_rng(7)
    parts = [Q.quantize(rng.standard_normal((n, 128)), lay)
             for n, lay in ((64, "int4"), (20, "int4"), (32, "int8"), (16, "int4x2"))]
    x = _x(128)
    for group in (parts[:2], parts):
        stacked = Q.concat_rows(group)
        assert stacked.out_features == sum(p.out_features for p in group)
        assert torch.equal(stacked.dequantize(), torch.cat([p.dequantize() for p in group]))
        ref = torch.cat([p.linear(x) for p in group], dim=-1)
        assert rel_error(stacked.linear(x), ref) < KERNEL_REL
    assert Q.concat_rows(parts[:2]).kind == "int4"  # one kernel call for q, k, v
    assert Q.concat_rows(parts).kind == "rows"


def test_linear_takes_tensors_and_packed_weights():
    w = torch.randn(32, 64)
    b = torch.randn(32)
    x = _x(64)
    assert torch.allclose(Q.linear(x, w, b), x @ w.T + b, atol=1e-5)
    p = Q.quantize(w, "int8")
    assert rel_error(Q.linear(x, p, b), x @ p.dequantize().T + b) < KERNEL_REL


# ---- the real default model (SmolLM2-135M Q4_1, embedding Q8_0) ----

@pytest.fixture(scope="module")
def source():
    from halollm.model.loader import open_source

    src = open_source(None)
    yield src
    src.close()


MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@pytest.mark.parametrize("layer", [0, 17])
def test_real_layers_pack_exactly_and_compactly(source, layer):
    """Every projection of two layers: the packed values equal the float loader's tensors
    (q/k in the Hugging Face row order) to bf16 scale rounding, outputs to kernel rounding,
    and the resident bytes equal the GGUF bytes (Q4_1 -> int4 is 1.0x)."""
    for name in MATRICES:
        full = f"layers.{layer}.{name}"
        assert G.shape(source, full)[2] == "Q4_1"
        p, nbytes = G.pack_rows(source, full)
        ref = torch.from_numpy(source.tensor(full))
        err = rel_error(p.dequantize(), ref)
        assert err < SCALE_REL, (full, err)
        _check_output(p, ref, err)
        assert p.nbytes == nbytes == G.gguf_nbytes(source, full)


def test_real_rows_and_column_groups_read_only_their_blocks(source):
    """Rows of q not in whole heads, and down-projection columns in whole 32-groups, packed
    from their raw blocks only: equal to the same slice of the whole tensor."""
    rows = np.array([130, 5, 64, 0, 575])
    p, nbytes = G.pack_rows(source, "layers.4.wq", rows)
    assert rel_error(p.dequantize(), torch.from_numpy(source.tensor("layers.4.wq"))[rows]
                     ) < SCALE_REL
    assert nbytes == 5 * 360
    whole = G.pack_rows(source, "layers.4.w_down")[0]
    cols = np.r_[np.arange(320, 352), np.arange(64, 128)]
    part, nbytes = G.pack_columns(source, "layers.4.w_down", cols)
    assert torch.equal(part.dequantize(), whole.dequantize()[:, cols])
    assert nbytes == 576 * 3 * 20  # three Q4_1 blocks per row
    heads = np.arange(64, 192)  # wo columns of query heads 1 and 2
    part, _ = G.pack_columns(source, "layers.4.wo", heads)
    assert part.kind == "int4"
    ref = torch.from_numpy(source.tensor("layers.4.wo"))[:, heads]
    assert rel_error(part.dequantize(), ref) < SCALE_REL


def test_real_scattered_columns(source):
    """Contribution-ordered (scattered) down columns: requantized to int8 per row (default,
    measured ~0.8%) or int4 (~8%: as large as Q4_1's own error) from the touched blocks."""
    cols = np.sort(np.random.default_rng(8).choice(1536, 300, replace=False))
    ref = torch.from_numpy(source.tensor("layers.9.w_down"))[:, cols]
    p8, nbytes = G.pack_columns(source, "layers.9.w_down", cols)
    assert p8.kind == "int8" and p8.in_features == 300
    assert rel_error(p8.dequantize(), ref) < 0.012
    _check_output(p8, ref, 0.012)
    p4, _ = G.pack_columns(source, "layers.9.w_down", cols, scattered="int4")
    assert 0.05 < rel_error(p4.dequantize(), ref) < 0.11


def test_real_head_and_embedding(source):
    """The tied Q8_0 embedding as the LM head: int4x2 (exact) at <= 1.18x the GGUF bytes;
    embedding rows looked up from it or from its raw blocks (bit-exact)."""
    head, _ = G.pack_rows(source, "embed")
    assert head.kind == "int4x2" and head.out_features == 49152
    assert head.nbytes <= 1.18 * G.gguf_nbytes(source, "embed")
    ids = torch.tensor([0, 1, 500, 49151])
    ref = torch.from_numpy(source.tensor("embed"))[ids]
    assert rel_error(G.embed_rows(head, ids), ref) < SCALE_REL
    table = G.QuantEmbedding.from_source(source)
    assert torch.equal(G.embed_rows(table, ids), ref)
    assert table.nbytes == G.gguf_nbytes(source, "embed")
    x = _x(576, t=2)
    assert rel_error(head.linear(x), x @ torch.from_numpy(source.tensor("embed")).T) < 6e-3
