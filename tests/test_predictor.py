"""The semantic-aware predictor: calibration end to end, checks, the ablation study, the
run-time criticality rule, and its use by a real cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from halollm.errors import HaloError
from halollm.groups import Partition
from halollm.predictor import ablation, store
from halollm.predictor.critical import critical_devices, critical_mask
from halollm.predictor.net import HalfPredictor
from halollm.predictor.partition import by_contribution
from halollm.predictor.signals import GroupedModel, chunked
from tests.conftest import TEXT_200, run_halo


def test_calibrate_writes_a_loadable_predictor(predictor_file, model_path):
    from halollm.model.loader import content_hash

    path, result = predictor_file
    assert result["predictor"] == str(path)
    p = store.load(path)
    assert p.model_hash == content_hash(model_path)
    assert p.meta["training_tokens"] == 2048 and p.meta["grouping"] == "contribution"
    assert p.meta["texts"][0]["name"] == "calibration.txt"
    assert len(p.partition.layers) == 30 and p.partition.count(0, "mlp") == 16
    # contribution grouping: every neuron exactly once, and not the contiguous blocks
    from halollm.model.loader import open_source

    src = open_source(None)
    p.partition.validate(src.config)
    assert p.partition != Partition.contiguous(src.config, 1, 16)
    rep = result["report"]
    assert set(rep["results"]) == {"0.05", "0.1", "0.2", "0.3"}
    assert set(rep["results"]["0.1"]) == {"predicted", "oracle", "static", "random"}
    # the oracle is the best any ranking can do at dropping whole groups
    for row in rep["results"].values():
        assert row["oracle"]["kl"] <= row["random"]["kl"]


def test_predictor_for_another_model_or_partition_is_refused(predictor_file, tmp_path):
    from tests.tiny import hf_tiny

    path, _ = predictor_file
    hf_tiny(tmp_path / "tiny")
    held = tmp_path / "held.txt"
    held.write_text(TEXT_200)
    r = run_halo("eval", "predictor", "--model", str(tmp_path / "tiny"), "--predictor",
                 str(path), "--text", str(held))
    assert r.returncode == 2 and "made for another model" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    p = store.load(path)
    from halollm.model.loader import open_source

    config = open_source(None).config
    with pytest.raises(HaloError, match="another group partition"):
        p.check(p.model_hash, Partition.contiguous(config, 1, 8))


def test_coordinator_refuses_a_mismatched_predictor(predictor_file):
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.keys import cluster_key
    from halollm.runtime.options import ClusterOptions

    path, _ = predictor_file
    with pytest.raises(HaloError, match="another group partition"):
        Coordinator(None, None, [], cluster_key("k"), ClusterOptions.build(predictor=str(path),
                                                                   mlp_groups=8))


def test_damaged_or_missing_predictor_is_a_clear_error(tmp_path):
    with pytest.raises(HaloError, match="no predictor file"):
        store.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(HaloError, match="not a readable predictor"):
        store.load(bad)


@pytest.fixture(scope="module")
def grouped(predictor_file):
    from halollm.model.loader import open_source, open_tokenizer

    src = open_source(None)
    p = store.load(predictor_file[0])
    return GroupedModel(src.config, src.tensor, p.partition), p, open_tokenizer(src)


def test_zero_drop_equals_the_full_model(grouped, model_fp32):
    gm, p, tok = grouped
    ids = tok.encode(TEXT_200)[:96]
    full = model_fp32.transformer.forward(ids)
    assert (ablation.forward_masked(gm, ids, None) - full).abs().max() < 1e-3
    res = ablation.ablate(gm, [ids], {"predicted": ablation.predicted(p.nets)}, [0.0])
    assert res["0"]["predicted"]["kl"] == 0.0 and res["0"]["predicted"]["agreement"] == 1.0
    assert res["0"]["predicted"]["ppl"] == res["full"]["model"]["ppl"]


def test_predicted_dropping_beats_random_on_held_out_text(grouped):
    gm, p, tok = grouped
    chunks = chunked(tok.encode(TEXT_200), 128)  # written for the tests: never calibrated on
    res = ablation.ablate(gm, chunks, {"predicted": ablation.predicted(p.nets),
                                       "random": ablation.random(0),
                                       "oracle": ablation.oracle()}, [0.1])
    row = res["0.1"]
    assert row["predicted"]["kl"] < 0.5 * row["random"]["kl"], row
    assert row["predicted"]["agreement"] > row["random"]["agreement"], row
    assert row["oracle"]["kl"] <= row["predicted"]["kl"] * 1.05, row


def test_eval_predictor_json_shape(predictor_file, tmp_path):
    path, _ = predictor_file
    text = tmp_path / "held.txt"
    text.write_text(TEXT_200)
    r = run_halo("eval", "predictor", "--predictor", str(path), "--text", str(text),
                 "--tokens", "96", "--fractions", "0,0.1", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["results"]) == {"0", "0.1"}
    assert out["results"]["0"]["predicted"]["kl"] == 0.0
    for method in ("predicted", "oracle", "static", "random"):
        assert {"kl", "agreement", "ppl"} <= set(out["results"]["0.1"][method])
    bad = run_halo("eval", "predictor", "--predictor", str(path), "--text", str(text),
                   "--fractions", "0.1,2")
    assert bad.returncode == 2 and "--fractions" in bad.stderr


# -- pure pieces ---------------------------------------------------------------------------
def test_critical_mask_is_the_smallest_set_reaching_the_share():
    rng = np.random.default_rng(0)
    for _ in range(300):
        G = int(rng.integers(2, 20))
        share = rng.random((1, G)) ** 4
        share /= share.sum()
        target = float(rng.random())
        mask = critical_mask(share, target)[0]
        chosen = np.sort(share[0][mask])[::-1]
        assert chosen.sum() >= target - 1e-9  # reaches the share
        assert chosen[:-1].sum() < target  # and one group fewer would not
        assert share[0][mask].min() >= share[0][~mask].max(initial=0)  # the largest ones
        owner = rng.integers(0, 4, G)
        assert critical_devices(share, target, owner) == set(owner[mask].tolist())
    assert not critical_mask(np.full((2, 4), 0.25), 0).any()
    assert critical_mask(np.full((2, 4), 0.25), 1).all()


def test_contribution_partition_puts_hot_neurons_first():
    from halollm.model.loader import open_source

    config = open_source(None).config
    contrib = torch.rand(config.n_layers, config.intermediate_size)
    part = by_contribution(config, contrib, 1, 16)
    part.validate(config)
    hottest = set(contrib[3].argsort(descending=True)[:96].tolist())
    assert set(part.layers[3].mlp[0]) == hottest


def test_folded_network_takes_raw_inputs():
    gen = torch.Generator().manual_seed(0)
    net = HalfPredictor.init(2, 8, 4, 3, gen)
    mean, std = torch.randn(2, 8), torch.rand(2, 8) + 0.5
    x = torch.randn(5, 8)
    folded = net.folded(mean, std)
    for layer in range(2):
        expected = net.scores(layer, (x - mean[layer]) / std[layer])
        assert torch.allclose(folded.scores(layer, x), expected, atol=1e-5)


def test_dropped_count():
    assert ablation.dropped_count(0, 16) == 0
    assert ablation.dropped_count(0.05, 16) == 1
    assert ablation.dropped_count(0.1, 16) == 2
    assert ablation.dropped_count(0.9, 2) == 1  # never every group


# -- in a real cluster -----------------------------------------------------------------------
def _cluster_tokens(addresses, predictor: Path, drop: float, **opts):
    from halollm.generate import generate
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.keys import cluster_key
    from halollm.runtime.options import ClusterOptions
    from halollm.sampling import SamplingParams

    coord = Coordinator(None, "fp32", addresses, cluster_key("pred-key"), ClusterOptions.build(
        predictor=str(predictor), drop_rates=[drop] * len(addresses), **opts))
    try:
        ids = coord.tokenizer.encode("The three most useful things to pack for a hike are")
        res = generate(coord, coord.tokenizer, ids, max_tokens=24,
                       sampling=SamplingParams(temperature=0.0))
        return res.token_ids, coord.sync_json()
    finally:
        coord.close()


def test_cluster_with_predictor_critical_contributions_always_arrive(predictor_file,
                                                                      model_fp32):
    from halollm.generate import LocalDecoder, generate
    from halollm.runtime.local import LocalWorkers
    from halollm.sampling import SamplingParams

    tok = model_fp32.tokenizer
    ref = generate(LocalDecoder(model_fp32.transformer), tok,
                   tok.encode("The three most useful things to pack for a hike are"),
                   max_tokens=24, sampling=SamplingParams(temperature=0.0)).token_ids
    path = predictor_file[0]
    with LocalWorkers(2, "pred-key", threads=1) as lw:
        # lossless, generous deadline: the predictor's partition computes the same tokens
        tokens, sync = _cluster_tokens(lw.addresses, path, 0.0, deadline_ms=5000)
        assert tokens == ref
        assert sync["predictor"]["path"] == str(path) and sync["lost"] == 0
        # 30% of datagrams dropped, everything critical: every missing contribution is
        # computed by the coordinator, so the tokens stay exact
        tokens, sync = _cluster_tokens(lw.addresses, path, 0.3, critical_share=1.0)
        assert tokens == ref
        assert sync["fallbacks"] > 0 and sync["lost"] == 0, sync
        # every fallback shard was built with the plan (memory allows), none at a deadline
        assert sync["fallbacks_prepared"] == 2 * 30 and sync["fallback_builds"] == 0, sync
        # nothing critical: contributions are lost instead
        _, sync = _cluster_tokens(lw.addresses, path, 0.3, critical_share=0.0)
        assert sync["lost"] > 0 and sync["predictions"] == 0, sync
