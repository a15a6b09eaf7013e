"""The packed-group cache: exact round trips of every packed kind, rebuilding a damaged or
foreign cache file, and streamed decoding from it giving the resident tokens."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from halollm.generate import LocalDecoder, generate
from halollm.groups import GroupId
from halollm.loader.group_cache import (
    GroupCache,
    cache_key,
    cache_path,
    encode,
    write_cache,
)
from halollm.loader.store import PREFETCH_AHEAD, GroupStore
from halollm.loader.streamed import StreamedDecoder
from halollm.loader.weights import GroupWeights
from halollm.model import quant
from halollm.model.formats import Scattered
from halollm.model.loader import load_model, open_source, open_tokenizer, resolve_format
from halollm.sampling import SamplingParams

PROMPT = "The capital of France is"
ORDER = [GroupId(0, "attn", 0), GroupId(0, "mlp", 0), GroupId(1, "mlp", 0)]


@pytest.fixture()
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def source():
    src = open_source(None)
    yield src
    src.close()


def _every_kind(seed: int) -> GroupWeights:
    """A group holding every matrix kind the store can hold (and a None)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(70, 96, generator=g)
    int4 = quant.quantize(w, "int4")
    mats = (int4, quant.quantize(w, "int8"), quant.quantize(w, "int4x2"),
            quant.RowConcat([int4, quant.quantize(w[:5], "int8")]),
            Scattered(quant.quantize(w, "int4"), np.array([3, 40, 41, 90])),
            torch.randn(7, 3, generator=g).half(), torch.randn(5, generator=g).bfloat16(), None)
    return GroupWeights(mats, file_bytes=123 + seed)


def _flat(w: GroupWeights) -> tuple[list, list[bytes]]:
    """(structure, every tensor's bytes) of a group: equal means bit-identical."""
    chunks: list[np.ndarray] = []
    specs = [encode(m, chunks, [0]) for m in w.tensors]
    return specs, [c.tobytes() for c in chunks]


def _groups() -> dict[GroupId, GroupWeights]:
    return {g: _every_kind(i) for i, g in enumerate(ORDER)}


def _build(path: Path, key: dict, groups: dict[GroupId, GroupWeights],
           said: list[str] | None = None) -> GroupCache:
    said = [] if said is None else said
    return GroupCache.open_or_build(path, key, ORDER, groups.__getitem__, said.append)


def test_every_packed_kind_round_trips_bit_identically(tmp_path):
    groups = _groups()
    key = {"test": 1}
    cache = _build(tmp_path / "c.bin", key, groups)
    x = torch.randn(2, 96)
    for g, want in groups.items():
        got = cache.load(g)
        assert _flat(got) == _flat(want)
        assert got.nbytes == want.nbytes and got.nbytes <= cache.size(g)
        for a, b in zip(got.tensors[:5], want.tensors[:5], strict=True):
            xa = x[:, : a.in_features]  # type: ignore[union-attr]
            assert torch.equal(a.linear(xa), b.linear(xa))  # type: ignore[union-attr]
    cache.close()


def test_a_released_buffer_is_reused_and_holds_the_next_group(tmp_path):
    groups = _groups()
    cache = _build(tmp_path / "c.bin", {"test": 1}, groups)
    first = cache.load(ORDER[0])
    cache.release(ORDER[0])  # the store evicted it: its buffer goes to the next load
    second = cache.load(ORDER[1])
    assert cache.size(ORDER[0]) == cache.size(ORDER[1])
    assert first.tensors[0].packed.data_ptr() == second.tensors[0].packed.data_ptr()  # type: ignore[union-attr]
    assert _flat(second) == _flat(groups[ORDER[1]])
    cache.close()


def test_the_model_groups_from_the_cache_equal_packing_from_the_model_file(source,
                                                                            cache_home):
    """Every group of the default model (packed from its Q4_1 blocks) read back from the
    cache is bit-identical to packing it from the model file again."""
    dec = StreamedDecoder(source, resolve_format(source), "100%", "demand")
    try:
        assert dec.cache is not None and dec.cache.path.parent == cache_home / "halo" / "groups"
        for g in dec.store.order:
            assert _flat(dec.cache.load(g)) == _flat(dec._read_model(g))
        assert dec.model_bytes == sum(dec.cache.size(g) for g in dec.store.order)
    finally:
        dec.close()


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        data[200] ^= 0xFF  # a byte of the first group's data
    elif how == "footer":
        data[-3] ^= 0xFF
    else:
        data = bytearray(b"not a cache at all")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped", "footer", "garbage"])
def test_a_damaged_cache_is_rebuilt(tmp_path, how):
    groups, key, path = _groups(), {"test": 1}, tmp_path / "c.bin"
    _build(path, key, groups).close()
    _damage(path, how)
    said: list[str] = []
    cache = _build(path, key, groups, said)
    assert any("not usable" in s and "rebuilding" in s for s in said)
    for g, want in groups.items():
        assert _flat(cache.load(g)) == _flat(want)
    cache.close()
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]  # no temporary file left


def test_a_cache_of_another_model_or_partition_is_not_used(tmp_path):
    """The key (model hash, format, partition, int4 layout) names the file, and a file with
    another key in its index is rebuilt, even under this key's name."""
    a = cache_key("aa" * 32, "gguf", '{"layers":[1]}')
    others = [cache_key("bb" * 32, "gguf", '{"layers":[1]}'),
              cache_key("aa" * 32, "q8", '{"layers":[1]}'),
              cache_key("aa" * 32, "gguf", '{"layers":[2]}')]
    assert len({cache_path(k) for k in [a, *others]}) == 4
    groups, path = _groups(), tmp_path / "c.bin"
    for other in others:
        write_cache(path, other, ORDER, groups.__getitem__, lambda s: None)
        said: list[str] = []
        _build(path, a, groups, said).close()
        assert any("another model" in s for s in said)
    said = []
    _build(path, a, groups, said).close()
    assert not any("not usable" in s for s in said)  # the rebuilt one is used


def test_an_unwritable_cache_falls_back_to_the_model_file(source, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # halo/groups cannot be made under it
    dec = StreamedDecoder(source, resolve_format(source), "100%", "demand")
    try:
        assert dec.cache is None
        assert dec.store.get(dec.store.order[0]).nbytes > 0
    finally:
        dec.close()


@pytest.fixture(scope="module")
def resident_tokens(source):
    model = load_model(None, None)
    tok = model.tokenizer
    return generate(LocalDecoder(model.transformer), tok, tok.encode(PROMPT), max_tokens=10,
                    sampling=SamplingParams(), ignore_eos=True).token_ids


@pytest.mark.parametrize("policy", ["prefetch", "demand"])
def test_streamed_at_half_budget_from_the_cache_gives_the_resident_tokens(
        source, cache_home, resident_tokens, policy):
    tok = open_tokenizer(source)
    dec = StreamedDecoder(source, resolve_format(source), "50%", policy)
    try:
        res = generate(dec, tok, tok.encode(PROMPT), max_tokens=10, sampling=SamplingParams(),
                       ignore_eos=True)
        stats = dec.loader_json()
    finally:
        dec.close()
    assert dec.cache is not None and res.token_ids == resident_tokens
    assert stats["misses"] + stats["hits"] > 0 and stats["bytes_loaded"] > 0
    assert stats["peak_resident_bytes"] <= dec.budget
    steady = stats["per_token"][2:]
    per_token = sum(t["bytes_loaded"] for t in steady) / len(steady)
    assert per_token < 0.62 * dec.model_bytes  # about the half that does not fit, no more


def test_prefetch_stays_close_to_the_farthest_future_reads():
    """Prefetching runs at most PREFETCH_AHEAD groups ahead, so a pass reads the groups that
    do not fit and at most that many more (unbounded, it read nearly every group)."""
    order = [GroupId(i, "mlp", 0) for i in range(20)]
    loaded: list[GroupId] = []

    def load(gid: GroupId) -> GroupWeights:
        loaded.append(gid)
        return GroupWeights((torch.zeros(1),), file_bytes=1)

    store = GroupStore(order, {g: 1 for g in order}, load, budget=10, policy="prefetch")
    for _ in range(6):
        for g in order:
            store.get(g)
            time.sleep(0.002)  # compute: the loader thread has time to run ahead
    store.close()
    assert len(loaded) <= 20 + 5 * (10 + PREFETCH_AHEAD + 1)
