"""The decode kernels in C (model/_kernels.c) against the torch code they mirror."""

from __future__ import annotations

import copy
import importlib.util
import shutil

import pytest
import torch

from halollm.model import llama
from halollm.model.attend import silu_mul
from halollm.model.config import ModelConfig
from halollm.model.kernels import KERNELS
from halollm.model.norm import rms_norm, rms_norm_reference


def test_the_c_norm_is_built_where_a_compiler_is() -> None:
    if shutil.which("cc") or shutil.which("gcc"):
        assert importlib.util.find_spec("halollm.model._kernels") is not None, \
            "model/_kernels.c did not build (see setup.py)"


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight", [torch.float32, torch.float16, torch.bfloat16])
def test_the_c_norm_is_the_formula_to_its_last_bit(out: torch.dtype, weight: torch.dtype
                                                   ) -> None:
    """float32 outputs within 2.5 eps of the exact value (torch's are within 2) and 4 ulp of
    torch's; bfloat16 outputs equal to torch's or one step apart (the only difference is the
    mean's summation), over scales from 1e-3 to 1e2, several widths and rows."""
    if KERNELS is None:
        pytest.skip("model/_kernels.c is not built here")
    gen = torch.Generator().manual_seed(int(out.itemsize) * 10 + weight.itemsize)
    for trial in range(300):
        dim = (64, 576, 1024, 2048, 5)[trial % 5]
        h = torch.randn(1 + trial % 3, dim, generator=gen) * 10.0 ** (trial % 6 - 3)
        w = (torch.randn(dim, generator=gen) * 0.5 + 1).to(weight)
        got, ref = rms_norm(h, w, 1e-5, out), rms_norm_reference(h, w, 1e-5, out)
        assert got.dtype == out and got.shape == ref.shape
        if out == torch.float32:  # a few roundings from the exact value, as torch is
            eps = torch.finfo(torch.float32).eps
            hd = h.double()
            exact = w.double() * hd / (hd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
            assert ((got.double() - exact).abs() <= 2.5 * eps * exact.abs()).all(), trial
            assert ((got - ref).abs() <= 4 * eps * ref.abs()).all(), trial
        else:  # neighbouring bfloat16 values are one apart as integers (same sign)
            steps = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
            assert int(steps.max()) <= 1, trial
            assert (got == ref).float().mean() > 0.5, trial  # mostly bit-identical


def test_what_the_c_norm_does_not_take_is_the_formula_itself() -> None:
    """float16 outputs, views that are not contiguous, and empty rows go to torch's formula."""
    h = torch.randn(4, 64)
    w = torch.rand(64) + 0.5
    assert torch.equal(rms_norm(h, w, 1e-6, torch.float16), rms_norm_reference(h, w, 1e-6,
                                                                               torch.float16))
    view = torch.randn(64, 4).t()
    assert torch.equal(rms_norm(view, w, 1e-6, torch.float32),
                       rms_norm_reference(view, w, 1e-6, torch.float32))
    assert rms_norm(torch.empty(0, 64), w, 1e-6, torch.bfloat16).shape == (0, 64)


def _attention_pair(bias: bool, head_dim: int = 32, n_heads: int = 8, n_kv: int = 4
                    ) -> tuple[llama.AttentionShard, llama.AttentionShard]:
    config = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=512, n_layers=1,
                         n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                         rope_theta=10000.0, rms_eps=1e-5, max_position=4096,
                         tie_embeddings=False, attn_bias=bias, rope_scaling=None,
                         rope_freq_factors=None)
    gen = torch.Generator().manual_seed(3)
    q, kv = n_heads * head_dim, n_kv * head_dim
    shapes = {"wq": (q, 256), "wk": (kv, 256), "wv": (kv, 256), "wo": (256, q),
              "bq": (q,), "bk": (kv,), "bv": (kv,)}
    weights = {f"layers.0.{n}": (torch.randn(s, generator=gen) * 0.1).numpy()
               for n, s in shapes.items()}
    rope = llama.Rope(config)
    heads = [1, n_kv - 1] if n_kv > 2 else list(range(n_kv))
    fast = llama.AttentionShard(config, 0, heads, weights.__getitem__, torch.float32, rope)
    return fast, copy.deepcopy(fast)


@pytest.mark.parametrize("bias", [False, True])
def test_a_decode_steps_attention_in_c_is_torchs(bias: bool, monkeypatch) -> None:
    """Decode steps through the C kernel and through torch's operators, side by side from the
    same prompt over 300 positions (the cache grows past its first 256): the keys and values
    they cache bitwise equal, their outputs within float32 rounding (grouped heads: 4 query
    heads of 2 KV heads)."""
    if KERNELS is None:
        pytest.skip("model/_kernels.c is not built here")
    fast, slow = _attention_pair(bias)
    _decode_side_by_side(fast, slow, 4, 6, 300, monkeypatch)
    assert fast.cache.k.shape[1] >= 300


def _decode_side_by_side(fast: llama.AttentionShard, slow: llama.AttentionShard, seed: int,
                         prompt: int, end: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A `prompt`-row prompt, then decode steps to position `end` through the C kernel
    (`fast`) and through torch's operators (`slow`): cached keys and values bitwise equal,
    outputs within float32 rounding."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(prompt, 256, generator=gen)
    assert torch.equal(fast.forward(rows, 0), slow.forward(rows, 0))
    for pos in range(prompt, end):
        x = torch.randn(1, 256, generator=gen)
        got = fast.forward(x, pos)
        with monkeypatch.context() as m:
            m.setattr(llama, "KERNELS", None)
            want = slow.forward(x, pos)
        assert torch.equal(fast.cache.k[:, :pos + 1], slow.cache.k[:, :pos + 1]), pos
        assert torch.equal(fast.cache.v[:, :pos + 1], slow.cache.v[:, :pos + 1]), pos
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), pos


@pytest.mark.parametrize(("head_dim", "n_heads", "n_kv"),
                         [(6, 4, 2), (20, 6, 3), (64, 9, 3), (128, 4, 4)])
def test_the_attention_kernels_vector_lanes_and_tails_are_torchs(head_dim: int, n_heads: int,
                                                                  n_kv: int, monkeypatch
                                                                  ) -> None:
    """The kernel sums q.k and the weighted values in eight-lane vectors, four key rows at a
    time, with tails one by one: head sizes that are and are not multiples of 8, query groups
    of 1 to 3 heads per KV head, and every count of positions modulo 4 give torch's attention
    to float32 rounding and torch's cached keys and values bitwise."""
    if KERNELS is None:
        pytest.skip("model/_kernels.c is not built here")
    fast, slow = _attention_pair(False, head_dim, n_heads, n_kv)
    _decode_side_by_side(fast, slow, head_dim, 3, 40, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mlps_activations_in_c_are_torchs_to_float32_rounding(dtype: torch.dtype) -> None:
    """silu(gate) * up from a projection's [T, 2n] output: within 2 eps of torch's float32
    formula, most values bitwise; shapes that do not fit go back to torch (None)."""
    if KERNELS is None:
        pytest.skip("model/_kernels.c is not built here")
    gen = torch.Generator().manual_seed(5)
    for trial in range(100):
        n = (1, 31, 402, 700)[trial % 4]
        gu = (torch.randn(1 + trial % 3, 2 * n, generator=gen) * 4).to(dtype)
        want = torch.nn.functional.silu(gu.float()[:, :n]) * gu.float()[:, n:]
        got = silu_mul(gu, n)
        assert got is not None and got.dtype == torch.float32 and got.shape == want.shape
        eps = torch.finfo(torch.float32).eps
        assert ((got - want).abs() <= 2 * eps * want.abs() + 1e-30).all(), trial
    assert silu_mul(gu, n + 1) is None  # not [T, 2n]
    assert silu_mul(gu.to(torch.float16), n) is None  # float16: torch's own rounding


def test_the_mlps_activations_in_bfloat16_are_the_float32_ones_rounded_as_torch_rounds(
) -> None:
    """silu_mul(.., bfloat16) is bitwise silu_mul(..).to(bfloat16), ties, huge values and
    infinities included (a NaN stays a NaN; torch's vector conversion writes it 0xffff, its
    scalar one 0x7fc0, the kernel 0x7fc0): a packed down projection's input, rounded by the
    kernel instead of a torch conversion after it, so the MLP's output does not change."""
    if KERNELS is None:
        pytest.skip("model/_kernels.c is not built here")
    gen = torch.Generator().manual_seed(6)
    special = torch.tensor([0.0, -0.0, 1e-40, 3e38, -3e38, float("inf"), float("nan"),
                            1.00390625, 1.01171875, -2.00390625])
    for trial in range(60):
        n = (1, 10, 402, 700)[trial % 4]
        gu = torch.randn(1 + trial % 2, 2 * n, generator=gen) * torch.exp(
            torch.randn(1 + trial % 2, 2 * n, generator=gen) * 4)
        if n >= 10:
            gu[0, n:n + 10] = special  # the up values: products at every edge
        for dtype in (torch.float32, torch.bfloat16):
            g = gu.to(dtype)
            want = silu_mul(g, n).to(torch.bfloat16)  # type: ignore[union-attr]
            got = silu_mul(g, n, torch.bfloat16)
            assert got is not None and got.dtype == torch.bfloat16
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan), (trial, dtype)
            assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan]), \
                (trial, dtype)
    assert silu_mul(gu, n, torch.float16) is None  # no float16 output


@pytest.mark.parametrize("layout", ["int4", "int8", "int4x2", "scattered"])
def test_a_packed_mlp_shard_is_unchanged_by_bfloat16_activations(layout: str) -> None:
    """MlpShard.forward hands a packed down projection activations the kernel rounded to
    bfloat16; the output is bitwise the float32 activations' (which the projection rounded
    itself), for every packed layout, a shard over scattered columns included."""
    import numpy as np

    from halollm.model.formats import Scattered
    from halollm.model.llama import MlpShard, project
    from halollm.model.quant import quantize

    if KERNELS is None:
        pytest.skip("model/_kernels.c is not built here")
    gen = torch.Generator().manual_seed(7)
    d, n = 96, 70
    gate_up = quantize(torch.randn(2 * n, d, generator=gen), "int4")
    if layout == "scattered":  # n of 96 columns of a down matrix, over whole blocks
        pos = np.sort(np.random.default_rng(0).choice(96, n, replace=False))
        down = Scattered(quantize(torch.randn(d, 96, generator=gen), "int4"), pos)
    else:
        down = quantize(torch.randn(d, n, generator=gen), layout)
    shard = MlpShard.of(tuple(range(n)), gate_up, down)
    for _ in range(20):
        x = torch.randn(1, d, generator=gen).to(torch.bfloat16)
        want = project(shard.activations(x), down)  # float32 activations
        assert shard.activations(x).dtype == torch.float32
        got = shard.forward(x)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_a_packed_attention_shard_is_unchanged_by_bfloat16_attention_output() -> None:
    """attend_one(.., bfloat16) is bitwise attend_one(..).to(bfloat16), and an attention shard
    whose o projection is packed (so it rounds its input to bfloat16 itself) gives bitwise
    what the float32 attention output gave, over 40 decode steps."""
    from halollm.model.attend import attend_one
    from halollm.model.quant import quantize

    if KERNELS is None:
        pytest.skip("model/_kernels.c is not built here")
    fast, slow = _attention_pair(False)
    w_qkv, b_qkv, w_o = fast._weights()
    packed = quantize(w_o, "int4")
    gen = torch.Generator().manual_seed(8)
    prompt = torch.randn(4, 256, generator=gen)
    fast.forward(prompt, 0)
    slow.forward(prompt, 0)
    for pos in range(4, 44):
        qkv = llama.project(torch.randn(1, 256, generator=gen), w_qkv, b_qkv).float()
        want = attend_one(qkv, fast.n_q, fast.n_kv, fast.head_dim, pos, fast.rope, slow.cache)
        got = attend_one(qkv, fast.n_q, fast.n_kv, fast.head_dim, pos, fast.rope, fast.cache,
                         torch.bfloat16)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))
        assert torch.equal(llama.project(got, packed).view(torch.int16),
                           llama.project(want, packed).view(torch.int16)), pos


def test_the_attention_kernel_widens_bfloat16_rows_as_torch_does() -> None:
    """A packed qkv product's bfloat16 rows handed to attend_one as they are give bitwise
    what their `.float()` gave: the output and the cached keys and values."""
    from halollm.model.attend import attend_one

    if KERNELS is None:
        pytest.skip("model/_kernels.c is not built here")
    fast, slow = _attention_pair(False)
    gen = torch.Generator().manual_seed(9)
    for pos in range(0, 40):
        qkv = (torch.randn(1, (fast.n_q + 2 * fast.n_kv) * fast.head_dim, generator=gen)
               * 3).to(torch.bfloat16)
        want = attend_one(qkv.float(), fast.n_q, fast.n_kv, fast.head_dim, pos, fast.rope,
                          slow.cache)
        got = attend_one(qkv, fast.n_q, fast.n_kv, fast.head_dim, pos, fast.rope, fast.cache)
        assert torch.equal(got, want), pos
        assert torch.equal(fast.cache.k[:, :pos + 1], slow.cache.k[:, :pos + 1]), pos
        assert torch.equal(fast.cache.v[:, :pos + 1], slow.cache.v[:, :pos + 1]), pos
