"""The distributed runtime with real worker processes and real sockets on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from halollm.errors import HaloError
from halollm.generate import LocalDecoder, generate
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import ENV, cluster_key
from halollm.runtime.local import READY, LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
from tests.conftest import run_halo

KEY = "test-cluster-key"
PROMPT = "The three most useful things to pack for a long hike are"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def workers():
    with LocalWorkers(3, KEY, threads=1) as lw:
        yield lw


@pytest.fixture(scope="module")
def reference_tokens(model_fp32):
    tok = model_fp32.tokenizer
    ids = tok.encode(PROMPT)
    return generate(LocalDecoder(model_fp32.transformer), tok, ids, max_tokens=32,
                    sampling=GREEDY).token_ids


def _generate(addresses, max_tokens=32, dtype="fp32", on_text=None, **opts):
    # one attention group per KV head and half the significance critical: workers hold
    # attention groups too (KV caches, repair, replay), the harder case than the defaults
    opts = {"attn_groups": 3, "coordinator_share": 0.5, "predictor": None, **opts}
    coord = Coordinator(None, dtype, addresses, cluster_key(KEY), ClusterOptions.build(**opts))
    try:
        ids = coord.tokenizer.encode(PROMPT)
        # lossy runs may turn to EOS early; the tests count tokens
        result = generate(coord, coord.tokenizer, ids, max_tokens=max_tokens, sampling=GREEDY,
                          on_text=on_text, ignore_eos=True)
        return result, coord.sync_json()
    finally:
        coord.close()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_strict_equals_single_device(workers, reference_tokens, n):
    result, sync = _generate(workers.addresses[:n], mode="strict")
    assert result.token_ids == reference_tokens
    assert sync["mode"] == "strict" and sync["lost"] == 0
    assert sync["received"] == sync["expected"] > 0
    assert sync["placement"]["groups_per_device"][1] > 0  # workers really computed groups


def test_workers_hold_attention_groups_in_these_tests(workers):
    coord = Coordinator(None, "fp32", workers.addresses, cluster_key(KEY),
                        ClusterOptions.build(attn_groups=3, coordinator_share=0.5,
                                             predictor=None))
    try:
        on_workers = [d for i in range(coord.config.n_layers)
                      for d in coord.placement.devices_in(i, "attn")]
    finally:
        coord.close()
    assert on_workers, "no attention group on a worker: KV repair/replay would go untested"


def test_relaxed_without_loss_equals_single_device(workers, reference_tokens):
    result, sync = _generate(workers.addresses, mode="relaxed", deadline_ms=5000)
    assert result.token_ids == reference_tokens
    assert sync["lost"] == 0 and sync["late"] == 0
    assert sync["received"] == sync["expected"] > 0
    assert sync["datagrams"].get("unauthenticated", 0) == 0
    reported = [w["reported"] for w in sync["workers"]]
    assert all(r.get("rounds", 0) > 0 for r in reported if r)
    stages = sync["stage_ms_per_round"]  # where a round's time went, on the coordinator
    assert set(stages) == {"send", "own", "gather", "sum"} and min(stages.values()) >= 0
    assert stages["gather"] > 0  # it waited for the workers' partials


def test_fp16_strict_matches_fp16_single_device(workers):
    from halollm.model.loader import load_model

    m = load_model(None, "fp16")
    ids = m.tokenizer.encode(PROMPT)
    ref = generate(LocalDecoder(m.transformer), m.tokenizer, ids, max_tokens=16,
                   sampling=GREEDY).token_ids
    result, _ = _generate(workers.addresses[:2], max_tokens=16, dtype="fp16", mode="strict")
    assert result.token_ids == ref


def _kill_after(lw: LocalWorkers, index: int, tokens: int):
    seen = []

    def on_text(_piece: str) -> None:
        seen.append(1)
        if len(seen) == tokens:
            lw.kill(index)
    return on_text


def test_worker_killed_mid_generation_relaxed_completes():
    with LocalWorkers(2, KEY, threads=1) as lw:
        result, sync = _generate(lw.addresses, max_tokens=40, mode="relaxed",
                                 on_text=_kill_after(lw, 0, 5), dead_after_s=0.6,
                                 rejoin_every_s=60)
    assert len(result.token_ids) == 40
    assert len(sync["takeovers"]) == 1
    assert sync["takeovers"][0]["worker"] == lw.addresses[0][0] + ":" + str(lw.addresses[0][1])
    assert not sync["workers"][0]["alive"] and sync["workers"][1]["alive"]
    assert sync["workers"][0]["groups"] == 0  # its groups now live on the coordinator


def test_strict_takeover_and_rejoin_stay_exact(reference_tokens):
    """Takeover rebuilds KV caches by replaying history, and a restarted worker gets its
    groups and caches back: strict decoding stays identical to the single device."""
    with LocalWorkers(2, KEY, threads=1) as lw:
        host, port = lw.addresses[0]
        restarted: list[subprocess.Popen] = []

        def on_text(_piece: str, count=[0]) -> None:  # noqa: B006
            count[0] += 1
            if count[0] == 4:
                lw.kill(0)
            if count[0] == 12:  # restart a worker on the same address
                p = subprocess.Popen([sys.executable, "-m", "halollm.cli.main", "worker",
                                      "--listen", f"{host}:{port}", "--threads", "1"],
                                     env={**__import__("os").environ, ENV: KEY},
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
                restarted.append(p)
                assert p.stdout is not None
                assert READY.search(p.stdout.readline())
        try:
            result, sync = _generate(lw.addresses, max_tokens=32, mode="strict",
                                     on_text=on_text, dead_after_s=0.6, rejoin_every_s=0.1)
        finally:
            for p in restarted:
                p.terminate()
                try:  # 10 s was once too short in CI (2 cores under the whole suite)
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    pytest.fail("a restarted worker did not exit within 60 s of SIGTERM")
    assert result.token_ids == reference_tokens
    assert len(sync["takeovers"]) == 1 and sync["recomputed"] >= 1
    assert len(sync["rejoins"]) == 1
    assert sync["workers"][0]["alive"] and sync["workers"][0]["groups"] > 0


def test_wrong_key_is_refused(workers):
    with pytest.raises(HaloError, match="wrong cluster key"):
        Coordinator(None, "fp32", workers.addresses[:1], cluster_key("another key"),
                    ClusterOptions.build(join_timeout_s=10))


def test_different_model_is_refused(tmp_path, workers):
    from tests.tiny import hf_tiny, write_gguf

    write_gguf(tmp_path / "other.gguf", hf_tiny(tmp_path / "hf"), "F32")
    with pytest.raises(HaloError, match="different model"):
        Coordinator(str(tmp_path / "other.gguf"), "fp32", workers.addresses[:1],
                    cluster_key(KEY), ClusterOptions.build(join_timeout_s=10))


def test_unreachable_worker_is_a_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with pytest.raises(HaloError, match="did not answer"):
        Coordinator(None, "fp32", [("127.0.0.1", port)], cluster_key(KEY),
                    ClusterOptions.build(join_timeout_s=1.5))
    assert time.monotonic() - t0 < 30


def test_port_in_use_is_one_clear_line(workers):
    host, port = workers.addresses[0]
    proc = run_halo("worker", "--listen", f"{host}:{port}", env={ENV: KEY}, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "in use" in proc.stderr


def test_a_free_port_whose_tcp_twin_is_taken_is_passed_over(monkeypatch):
    """`--listen HOST:0`: the kernel's free UDP port can be a port some TCP connection uses
    (ephemeral ports are shared; a CI run once lost a worker to it). The worker then takes
    another free port instead of exiting. The first UDP socket is steered onto a port whose
    TCP twin is held here; the binds are real."""
    import socket

    from halollm.runtime import worker as worker_module

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    real = worker_module.UdpEndpoint
    asked = []

    def steered(host, port, *args, **kwargs):
        asked.append(port)
        return real(host, taken if len(asked) == 1 else port, *args, **kwargs)

    monkeypatch.setattr(worker_module, "UdpEndpoint", steered)
    w = worker_module.Worker("127.0.0.1", 0, cluster_key(KEY), None)
    try:
        assert asked == [0, 0] and w.port != taken
    finally:
        w.close()
        held.close()
    # an explicit port whose TCP twin is taken stays a clear error, not another port
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    monkeypatch.setattr(worker_module, "UdpEndpoint", real)
    with pytest.raises(HaloError, match="in use"):
        worker_module.Worker("127.0.0.1", held.getsockname()[1], cluster_key(KEY), None)
    held.close()


def test_cli_run_local_json():
    proc = run_halo("run", "The capital of France is", "--local", "2", "--max-tokens", "8",
                    "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mode"] == "relaxed" and len(out["token_ids"]) == 8
    sync = out["sync"]
    for key in ("expected", "received", "late", "lost", "waited_ms", "per_token"):
        assert key in sync
    assert len(sync["per_token"]) == 8
    # every expected contribution arrived, was lost, or was computed by the coordinator
    # (critical and missing at the deadline, or taken over from a dead worker)
    assert sync["expected"] > 0
    assert sync["received"] + sync["lost"] + sync["fallbacks"] + sync["recomputed"] == \
        sync["expected"]
    # the coordinator's CPU for decode rounds with workers: 7 decode steps, 2 halves of 30
    # layers at most, with 1 or 2 workers each
    hub = sync["hub_cpu"]
    assert 0 < hub["rounds"] <= 7 * 2 * 30 and 1 <= hub["workers_per_round"] <= 2
    assert hub["ms_per_round"] > 0


def test_userspace_loss_is_tolerated_and_kv_repaired():
    """20% of datagrams dropped in both directions on one worker: relaxed decoding finishes,
    the losses are counted, and the worker repairs its KV cache from the coordinator."""
    with LocalWorkers(2, KEY, threads=1, drop_rates=[0.2, 0.0]) as lw:
        result, sync = _generate(lw.addresses, max_tokens=32, mode="relaxed",
                                 drop_rates=[0.2, 0.0], deadline_ms=30)
    assert len(result.token_ids) == 32
    assert sync["lost"] > 0 and sync["received"] > 0
    assert sync["datagrams"].get("dropped_emulated", 0) > 0
    lossy = sync["workers"][0]["reported"]
    assert lossy["repair_requests"] > 0 and sync["repairs_served"] > 0
    assert lossy["datagrams"].get("dropped_emulated", 0) > 0


def test_hostile_traffic_does_not_disturb_a_live_worker(workers, reference_tokens):
    import socket

    import zmq

    host, port = workers.addresses[0]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for junk in (b"", b"HL", b"HL" + b"\x01" * 100, b"\xff" * 1400):
        s.sendto(junk, (host, port))
    s.close()
    ctx = zmq.Context.instance()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(f"tcp://{host}:{port}")
    d.send_multipart([b'{"kind":"bye","session":1}', b"0" * 16])  # forged control
    d.send_multipart([b"HL" + b"\x00" * 60])  # forged strict-mode data
    d.close()
    result, _ = _generate(workers.addresses, mode="strict")
    assert result.token_ids == reference_tokens


def test_idle_keepalive_between_requests(workers, reference_tokens):
    """What `halo serve` does between requests: ping the workers, check the links; the next
    request is unaffected."""
    coord = Coordinator(None, "fp32", workers.addresses, cluster_key(KEY),
                        ClusterOptions.build(mode="strict", predictor=None))
    try:
        coord.idle()
        time.sleep(0.3)
        coord.idle()
        assert all(link.alive for link in coord.links)
        ids = coord.tokenizer.encode(PROMPT)
        result = generate(coord, coord.tokenizer, ids, max_tokens=32, sampling=GREEDY)
        assert result.token_ids == reference_tokens
        assert coord.sync_json()["takeovers"] == []
    finally:
        coord.close()


def test_equal_placement_strict_equals_single_device(workers, reference_tokens):
    """distributed-llama's split: every device, the coordinator included, gets an equal share
    of every layer's groups; strict mode stays token-exact."""
    coord = Coordinator(None, "fp32", workers.addresses, cluster_key(KEY),
                        ClusterOptions.build(mode="strict", predictor=None, placement="equal"))
    try:
        p = coord.placement  # attention too is split by KV heads, one group per device
        n = min(p.n_devices, coord.config.n_kv_heads)
        assert len(p.partition.layers[0].attn) == n
        assert all(len(p.groups_of(d, 0, "attn")) == 1 for d in range(n))
        counts = coord.placement.summary()["groups_per_device"]
        assert max(counts) - min(counts) <= coord.config.n_layers  # at most 1 per half
        assert all(c > 0 for c in counts)
        ids = coord.tokenizer.encode(PROMPT)
        result = generate(coord, coord.tokenizer, ids, max_tokens=32, sampling=GREEDY)
        assert result.token_ids == reference_tokens
    finally:
        coord.close()


def test_workers_placement_strict_equals_single_device(workers, reference_tokens):
    """The same split over the workers only: the coordinator computes no group (it embeds,
    norms, sums and samples), every worker takes as many, the LM head's rows are split over
    them too, and strict mode stays exact."""
    coord = Coordinator(None, "fp32", workers.addresses, cluster_key(KEY),
                        ClusterOptions.build(mode="strict", predictor=None, placement="workers"))
    try:
        p, n = coord.placement, len(workers.addresses)
        assert p.count(0) == 0
        assert len(p.partition.layers[0].mlp) % n == 0  # a multiple of the workers, >= 16
        assert len(p.partition.layers[0].mlp) >= 16
        assert len(p.partition.layers[0].attn) == min(n, coord.config.n_kv_heads)
        counts = p.summary()["groups_per_device"][1:]
        assert len(set(counts)) == 1 and counts[0] > 0
        ids = coord.tokenizer.encode(PROMPT)
        result = generate(coord, coord.tokenizer, ids, max_tokens=32, sampling=GREEDY)
        assert result.token_ids == reference_tokens
        sync = coord.sync_json()
        assert sync["stage_ms_per_round"]["own"] < 0.05  # nothing of its own
        # the LM head too: its rows over the workers, one round per token (the prompt's too)
        assert sync["head"]["rounds"] == len(result.token_ids) and sync["head"]["recomputed"] == 0
    finally:
        coord.close()


@pytest.mark.parametrize("placement", ["memory", "halo"])
def test_strict_is_exact_with_every_placement(workers, reference_tokens, placement):
    """Placement decides speed, never the result: strict mode stays token-exact. The
    coordinator's memory budget (a fifth of the model) forces the workers to hold groups."""
    result, sync = _generate(workers.addresses, mode="strict", placement=placement,
                             memory_budget=12 << 20)
    assert result.token_ids == reference_tokens
    assert sync["placement"]["policy"] == placement
    assert sum(sync["placement"]["groups_per_device"][1:]) > 0
    assert all(w["profile"]["speed_neurons_per_ms"] > 0 for w in sync["workers"])



def test_halo_placement_probes_every_link_before_its_first_plan(reference_tokens):
    """Before the first plan, empty rounds (phase PROBE) go to each worker alone, then
    through the real round code to one worker and to all of them, over the session's own
    transport (UDP in relaxed mode, TCP in strict):
    every worker answers every probe (before it holds any plan), the coordinator learns
    each round trip and its own cost per worker and per round, and the first plan is made
    from those, not from guesses; the tokens stay exact."""
    from halollm.runtime.probe import ALONE_ROUNDS, TOGETHER_ROUNDS
    from halollm.scheduler.profile import DEFAULT_HUB_MS

    with LocalWorkers(2, KEY, threads=1) as lw:
        for runs, mode in enumerate(("relaxed", "strict"), start=1):
            result, sync = _generate(lw.addresses, mode=mode, placement="halo",
                                     memory_budget=12 << 20)
            if mode == "strict":
                assert result.token_ids == reference_tokens
            probe = sync["probe"]
            assert probe["missed"] == 0
            assert sorted(probe["rtt_ms"]) == ["1", "2"]
            assert all(0 < ms < 1000 for ms in probe["rtt_ms"].values())
            assert probe["hub_ms_per_worker"] is not None
            assert probe["hub_ms_per_round"] is not None
            assert probe["hub_ms_per_worker"] + probe["hub_ms_per_round"] > 0
            assert probe["hub_ms_per_worker"] != DEFAULT_HUB_MS
            assert [w["profile"]["probe_ms"] for w in sync["workers"]] == \
                [probe["rtt_ms"][str(i)] for i in (1, 2)]
            # every probe answered, counted in the workers' heartbeats: the first worker
            # is in the hub rounds at one worker and at all of them
            assert [w["reported"]["probes"] for w in sync["workers"]] == \
                [runs * (ALONE_ROUNDS + 2 * TOGETHER_ROUNDS),
                 runs * (ALONE_ROUNDS + TOGETHER_ROUNDS)]

def test_halo_replans_after_a_worker_dies_and_stays_exact(reference_tokens):
    """HALO placement, strict mode: a worker killed mid-generation is taken over, the next
    token re-plans over the devices left (the coordinator rebuilds its shards, attention
    KV refilled from the token history), and the tokens stay exactly the single-device
    ones."""
    with LocalWorkers(2, KEY, threads=1) as lw:
        result, sync = _generate(lw.addresses, mode="strict", placement="halo",
                                 memory_budget=12 << 20, on_text=_kill_after(lw, 0, 5),
                                 dead_after_s=0.6, rejoin_every_s=60)
    assert result.token_ids == reference_tokens
    assert len(sync["takeovers"]) == 1
    reasons = [r["reason"] for r in sync["placement"]["replans"]]
    assert reasons[0] == "initial" and "membership" in reasons
    assert sync["placement"]["groups_per_device"][1] == 0  # nothing left on the dead worker


def test_a_worker_killed_while_a_plan_is_loading_is_taken_over(reference_tokens):
    """A worker dies just as a plan change goes out, before any heartbeat could be missed
    (dead_after_s is long): its dropped connection ends the wait for its `ready` (no 120 s
    hang, no error), the coordinator takes its groups over and strict mode stays exact."""
    with LocalWorkers(2, KEY, threads=1) as lw:
        coord = Coordinator(None, "fp32", lw.addresses, cluster_key(KEY), ClusterOptions.build(
            mode="strict", placement="halo", memory_budget=12 << 20, predictor=None,
            attn_groups=3, coordinator_share=0.5, dead_after_s=60, rejoin_every_s=600))
        try:
            seen = []

            def on_text(_piece: str) -> None:
                seen.append(1)
                if len(seen) == 5:
                    lw.kill(0)
                    coord.planner.force = True  # a re-plan at the next token: a plan goes out
            ids = coord.tokenizer.encode(PROMPT)
            result = generate(coord, coord.tokenizer, ids, max_tokens=32, sampling=GREEDY,
                              on_text=on_text, ignore_eos=True)
            sync = coord.sync_json()
        finally:
            coord.close()
    assert result.token_ids == reference_tokens
    assert [t["reason"] for t in sync["takeovers"]] == [
        "connection closed while loading its plan"]
    assert sync["placement"]["groups_per_device"][1] == 0
    # the takeover inside the plan change is not forgotten: the next token re-plans over the
    # workers left, and the planner's last record is the plan actually in force
    replans = sync["placement"]["replans"]
    assert [r["reason"] for r in replans[-2:]] == ["membership", "membership"]
    assert replans[-1]["groups_per_device"] == sync["placement"]["groups_per_device"]


def test_workers_stream_a_plan_larger_than_their_memory_budget(reference_tokens):
    """Workers offering 8 MiB hold shares of ~100 MiB: they stream their weights from the
    model file (halo worker --memory-budget) and strict mode stays token-exact."""
    with LocalWorkers(2, KEY, threads=1, extra_args=["--memory-budget", "8M"]) as lw:
        result, sync = _generate(lw.addresses, mode="strict", placement="static")
    assert result.token_ids == reference_tokens
    loader = sync["workers"][0]["reported"]["loader"]
    assert loader is not None and loader["loads"] > 0
    assert loader["peak_resident_bytes"] <= 8 << 20


def test_a_worker_whose_budget_cannot_hold_a_layer_share_is_a_clear_error():
    with LocalWorkers(1, KEY, threads=1, extra_args=["--memory-budget", "64K"]) as lw:
        with pytest.raises(HaloError, match="cannot take its groups: its memory budget"):
            Coordinator(None, "fp32", lw.addresses, cluster_key(KEY),
                        ClusterOptions.build(predictor=None, coordinator_share=0.5))
