"""The LM head split by vocabulary rows over the workers (`--head workers`, the default with
`--placement workers`), with real worker processes on loopback: the logits are bitwise the
whole head's in every format, over TCP (strict), the native UDP gather and the Python path,
and a worker's rows that miss the deadline are computed by the coordinator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from halollm.generate import LocalDecoder, generate
from halollm.groups import head_spans
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import ENV, cluster_key
from halollm.runtime.local import READY, LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams

KEY = "test-head-key"
PROMPT = "The three most useful things to pack for a long hike are"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def reference_tokens(model_fp32):
    ids = model_fp32.tokenizer.encode(PROMPT)
    return generate(LocalDecoder(model_fp32.transformer), model_fp32.tokenizer, ids,
                    max_tokens=32, sampling=GREEDY).token_ids


@pytest.fixture(scope="module")
def workers():
    with LocalWorkers(2, KEY, threads=1) as lw:
        yield lw


def test_head_spans_deal_every_row_once_in_order() -> None:
    spans = head_spans(49152, [1, 2, 5])
    assert spans == {1: (0, 16384), 2: (16384, 16384), 5: (32768, 16384)}
    spans = head_spans(10, [3, 4, 6, 7])
    assert [n for _, n in spans.values()] == [3, 3, 2, 2]
    rows = [r for first, n in spans.values() for r in range(first, first + n)]
    assert rows == list(range(10))


def _coordinator(workers, dtype: str | None, **opts) -> Coordinator:
    return Coordinator(None, dtype, workers.addresses, cluster_key(KEY),
                       ClusterOptions.build(predictor=None, placement="workers", **opts))


@pytest.mark.parametrize(("dtype", "mode"), [("fp32", "strict"), (None, "strict"),
                                             (None, "relaxed"), ("fp16", "relaxed")])
def test_split_head_logits_are_bitwise_the_whole_heads(workers, dtype, mode) -> None:
    """fp32, fp16 and the default model's packed format (Q4_1 pairs, computed in bf16): each
    worker's rows of the head, sent back in the compute dtype and placed side by side, then
    refined like the whole head's, give exactly the coordinator's own logits."""
    coord = _coordinator(workers, dtype, mode=mode, deadline_ms=2000)
    try:
        vocab, d = coord.config.vocab_size, coord.config.hidden_size
        assert coord.head.spans == head_spans(vocab, [1, 2])
        torch.manual_seed(0)
        for pos in range(3):
            h = torch.randn(1, d) * 4
            got = coord.head.logits(h, pos, coord.links.links)
            assert torch.equal(got, coord.model.logits(h)[-1])
        head = coord.sync_json()["head"]
        assert head["rounds"] == 3 and head["recomputed"] == 0
    finally:
        coord.close()


def test_rows_missing_at_the_deadline_are_computed_by_the_coordinator(workers) -> None:
    """Everything from worker 1 is dropped on arrival (user-space loss): its rows miss the
    deadline and the coordinator computes them from its own copy of the head; the logits are
    still the whole head's, bitwise."""
    coord = _coordinator(workers, None, mode="relaxed", deadline_ms=30)
    try:
        coord.udp.drop_from[coord.links.links[0].udp_addr] = 1.0
        torch.manual_seed(1)
        h = torch.randn(1, coord.config.hidden_size) * 4
        assert torch.equal(coord.head.logits(h, 0, coord.links.links), coord.model.logits(h)[-1])
        assert coord.sync_json()["head"] == {**coord.sync_json()["head"], "rounds": 1,
                                             "recomputed": 1}
    finally:
        coord.close()


def test_head_on_the_coordinator_when_asked(workers) -> None:
    coord = _coordinator(workers, "fp32", mode="strict", head="coordinator")
    try:
        assert coord.head.spans == {}
        h = torch.randn(1, coord.config.hidden_size)
        assert torch.equal(coord.head.logits(h, 0, coord.links.links), coord.model.logits(h)[-1])
        assert coord.sync_json()["head"]["rounds"] == 0
    finally:
        coord.close()


def test_a_worker_lost_and_back_keeps_the_split_head_exact(reference_tokens) -> None:
    """Strict mode, the workers placement: a worker killed after 4 tokens is taken over
    (its layer groups and its head rows: the rows are dealt out again over the live worker)
    and, restarted on its address, rejoins and gets both back; every token stays the single
    device's, and every token's logits came from a head round but those of the tokens the
    loss interrupted."""
    with LocalWorkers(2, KEY, threads=1) as lw:
        host, port = lw.addresses[0]
        restarted: list[subprocess.Popen] = []
        coord = _coordinator(lw, "fp32", mode="strict", dead_after_s=0.6, rejoin_every_s=0.1)
        spans_seen = []

        def on_text(_piece: str, count=[0]) -> None:  # noqa: B006
            count[0] += 1
            spans_seen.append(dict(coord.head.spans))
            if count[0] == 4:
                lw.kill(0)
            if count[0] == 12:
                p = subprocess.Popen([sys.executable, "-m", "halollm.cli.main", "worker",
                                      "--listen", f"{host}:{port}", "--threads", "1"],
                                     env={**os.environ, ENV: KEY}, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
                restarted.append(p)
                assert p.stdout is not None and READY.search(p.stdout.readline())
        try:
            ids = coord.tokenizer.encode(PROMPT)
            result = generate(coord, coord.tokenizer, ids, max_tokens=32, sampling=GREEDY,
                              on_text=on_text)
            sync = coord.sync_json()
        finally:
            coord.close()
            for p in restarted:
                p.terminate()
                p.wait(timeout=10)
    assert result.token_ids == reference_tokens
    assert len(sync["takeovers"]) == 1 and len(sync["rejoins"]) == 1
    vocab = coord.config.vocab_size
    assert {2: (0, vocab)} in spans_seen  # the live worker alone
    assert spans_seen[-1] == head_spans(vocab, [1, 2])  # both again after the rejoin
    assert sync["head"]["rounds"] >= len(result.token_ids) - 2
