"""Calibration from a fresh clone: the shipped book, the lean recording of training inputs,
`halo calibrate` without --text, and the predictor `halo demo` makes when none is saved."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from fnmatch import fnmatch

import pytest
import torch

from halollm.groups import KINDS, Partition
from halollm.predictor import store, train
from halollm.predictor.calibrate import (
    DEFAULT_TEXT,
    CalibrationOptions,
    default_text,
    ensure_predictor,
    read_texts,
)
from halollm.predictor.signals import GroupedModel, collect
from tests.conftest import ROOT, run_halo

BOOK_SHA256 = "b44b499274ef98e0bc12c190ee08d9c63480b7c96946101a540a0cb24b3a944c"


def test_the_book_ships_in_the_package_with_its_provenance():
    path = default_text()
    assert path.name == DEFAULT_TEXT and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BOOK_SHA256
    provenance = (path.parent / "README.md").read_text()
    assert BOOK_SHA256 in provenance and "public domain" in provenance
    assert read_texts(None)[0][0] == str(path)  # no --text: the book
    # setuptools puts it in built packages too (not only in this source tree)
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["halollm"]
    for name in (DEFAULT_TEXT, "README.md"):
        assert any(fnmatch(f"data/{name}", p) for p in patterns), patterns


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from halollm.model.loader import open_source
    from tests.tiny import hf_tiny, write_gguf

    folder = tmp_path_factory.mktemp("tiny") / "model"
    write_gguf(folder.parent / "tiny.gguf", hf_tiny(folder))
    return folder, open_source(folder)


def test_recording_everything_matches_collect(tiny):
    _, src = tiny
    part = Partition.contiguous(src.config, 2, 4)
    gm = GroupedModel(src.config, src.tensor, part)
    chunks = [list(range(3, 43)), list(range(50, 80))]
    data = train.record(gm, chunks, sample=10_000)
    ref = collect(gm, chunks)
    assert data.tokens == data.sampled == 70
    for kind in KINDS:
        assert data.x[kind].dtype == train.STORED and data.x[kind].element_size() == 1
        decoded = data.inputs(kind)
        for i in range(src.config.n_layers):
            _close_as_float8(decoded[i], ref.x[(i, kind)].float(), data.center[kind][i],
                             data.scale[kind][i])
            share = ref.sig[(i, kind)] / ref.sig[(i, kind)].sum(-1, keepdim=True)
            assert torch.allclose(data.share[kind][i].float(), share, atol=1e-3)
            assert torch.allclose(data.static(kind)[i], ref.sig[(i, kind)].mean(0), atol=1e-5)


def test_recording_a_sample_keeps_only_its_inputs(tiny):
    _, src = tiny
    gm = GroupedModel(src.config, src.tensor, Partition.contiguous(src.config, 1, 4))
    chunks = [list(range(3, 43)), list(range(50, 80))]
    data = train.record(gm, chunks, sample=16)
    ref = collect(gm, chunks)
    assert set(data.x) == {"mlp"}  # one attention group: nothing to predict, nothing kept
    assert data.x["mlp"].shape == (src.config.n_layers, 16, src.config.hidden_size)
    all_rows = ref.x[(0, "mlp")].float()
    for row in data.inputs("mlp")[0]:  # each kept input is one token's, as recorded
        nearest = all_rows[(all_rows - row).abs().sum(-1).argmin()]
        _close_as_float8(row, nearest, data.center["mlp"][0], data.scale["mlp"][0])
    # the static ranking still counts every token
    assert torch.allclose(data.static("mlp")[1], ref.sig[(1, "mlp")].mean(0), atol=1e-5)
    assert train.sample_size(gm, budget=1 << 20) == (1 << 20) // (
        src.config.n_layers * (src.config.hidden_size + 2 * 4))


def _close_as_float8(decoded: torch.Tensor, exact: torch.Tensor, center: torch.Tensor,
                     scale: torch.Tensor) -> None:
    """Within float8 e4m3's rounding of (x - center) / scale (3 mantissa bits; steps of
    2^-9 below 2^-6), plus fp16's."""
    bound = (exact - center).abs() / 16 + scale * 2.0 ** -9 + exact.abs() * 2.0 ** -10 + 1e-5
    assert ((decoded - exact).abs() <= bound).all()


def test_calibrate_without_text_uses_the_book_and_reports_peak_memory(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "p.safetensors"
    r = run_halo("calibrate", "--model", str(folder), "--max-tokens", "256", "--context", "64",
                 "--holdout", "64", "--epochs", "2", "--mlp-groups", "4", "--sample-tokens",
                 "100", "--threads", "1", "--out", str(out), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["texts"][0]["name"] == DEFAULT_TEXT
    assert res["texts"][0]["sha256"] == BOOK_SHA256
    assert res["training_tokens"] == 256 and res["sampled_tokens"] == 100
    assert 50 << 20 < res["peak_rss_bytes"] < 8 << 30
    assert store.load(out).partition.count(0, "mlp") == 4


def test_ensure_predictor_calibrates_once_then_finds_it(tiny, tmp_path, monkeypatch):
    model = tiny[0].parent / "tiny.gguf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    logs: list[str] = []
    opts = CalibrationOptions(mlp_groups=4, max_tokens=128, context=64, holdout_tokens=0,
                              epochs=1)
    path = ensure_predictor(model, lambda label, total: lambda n=1: None, logs.append, opts)
    assert path == store.default_path(model) and path.is_file()
    assert any("calibrating once" in m for m in logs)
    logs.clear()
    assert ensure_predictor(model, lambda label, total: lambda n=1: None, logs.append,
                            opts) == path
    assert logs == []  # found: nothing to do


def test_demo_help_names_the_calibration_and_the_single_device():
    r = run_halo("demo", "--help")
    assert r.returncode == 0
    text = re.sub(r"\s+", " ", r.stdout)
    assert "--calibrate-tokens" in text and "shipped with HALO" in text
    assert "alone, in one process" in text



def test_report_merged_from_single_sequences_equals_one_report(tiny):
    from halollm.predictor import report
    from halollm.predictor.calibrate import merge_reports
    from halollm.predictor.store import Predictor

    _, src = tiny
    cfg = src.config
    part = Partition.contiguous(cfg, 1, 4)
    gm = GroupedModel(cfg, src.tensor, part)
    nets = {k: train.untrained(cfg.n_layers, cfg.hidden_size, 8, part.count(0, k), seed=1)
            for k in KINDS}
    static = {k: torch.rand(cfg.n_layers, part.count(0, k)) for k in KINDS}
    pred = Predictor(nets, static, part, "x")
    chunks = [list(range(3, 35)), list(range(40, 72))]
    whole = report.quality(gm, pred, chunks, fractions=(0.25, 0.5))
    merged = merge_reports([report.quality(gm, pred, [c], fractions=(0.25, 0.5))
                            for c in chunks])
    assert merged["tokens"] == whole["tokens"] == 64
    assert merged["full"]["ppl"] == pytest.approx(whole["full"]["ppl"], rel=1e-4)
    for frac, row in whole["results"].items():
        for method in ("predicted", "oracle", "static"):  # random draws differ per call
            for key, tol in (("kl", 2e-5), ("agreement", 2e-4), ("ppl", 1e-4)):
                assert merged["results"][frac][method][key] == pytest.approx(
                    row[method][key], rel=tol, abs=tol), (frac, method, key)
    for key, value in whole["ranking"]["mlp"].items():
        assert merged["ranking"]["mlp"][key] == pytest.approx(value, abs=2e-4), key
