"""The lossy-network testbed: spec validation (anywhere) and real namespaces (root only)."""

from __future__ import annotations

import json

import pytest

from halollm.errors import HaloError
from halollm.testbed.spec import load_spec, parse_spec
from halollm.testbed.system import unavailable
from tests.conftest import SHARED_DATA, one_clear_line, run_halo

ROOT_TOOLS = not unavailable()
needs_root = pytest.mark.skipif(not ROOT_TOOLS, reason=f"{unavailable()}; CI runs it as root")


@pytest.mark.parametrize("data,needle", [
    ({"device": [{"name": "a", "los": 0.1}]}, "unknown key 'los' (did you mean 'loss'?)"),
    ({"device": [{"name": "a", "loss": 1.5}]}, "loss_in must be in [0, 1.0)"),
    ({"device": [{"name": "a", "loss": 0.1, "loss_in": 0.2}]}, "either loss or loss_in"),
    ({"device": [{"name": "a", "bandwidth": "fast"}]}, "is not like '100mbit'"),
    ({"device": [{"name": "a", "cpu": 0}]}, "at least 0.01"),
    ({"device": [{"name": "a"}, {"name": "a"}]}, "duplicate device name"),
    ({"device": []}, "no [[device]] entries"),
    ({"name": "Bad Name", "device": [{"name": "a"}]}, "must be 1-8 lowercase"),
    ({"devices": [{"name": "a"}]}, "unknown key 'devices' (did you mean 'device'?)"),
    ({"port": 80, "device": [{"name": "a"}]}, "port must be an integer in 1024..65535"),
    ({"device": [{"name": "a", "jitter_ms": 3}]}, "jitter_ms needs a delay_ms"),
])
def test_bad_specs_are_refused_clearly(data, needle):
    with pytest.raises(HaloError) as exc:
        parse_spec(data)
    assert needle in str(exc.value)


def test_spec_parses_units(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('name = "t"\n[[device]]\nname = "pi1"\nloss_in = 0.02\nbandwidth = "10mbit"\n'
                 'cpu = 0.5\nmemory = "512MiB"\n')
    spec = load_spec(f)
    d = spec.devices[0]
    assert (d.loss_in, d.loss_out, d.bandwidth_bps, d.cpu, d.memory_bytes) == (
        0.02, 0.0, 10_000_000, 0.5, 512 * 2**20)
    assert spec.device_address(d) == "10.77.1.2" and len(spec.veth(d)[0]) <= 15
    (tmp_path / "bad.toml").write_text("name = [")
    with pytest.raises(HaloError, match="not valid TOML"):
        load_spec(tmp_path / "bad.toml")
    proc = run_halo("testbed", "status", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2 and "spec file not found" in proc.stderr


def test_delay_is_refused_without_netem(tmp_path):
    from halollm.testbed import system

    if not ROOT_TOOLS:
        pytest.skip("needs root")
    if system.netem_available():
        pytest.skip("this kernel has netem")
    f = tmp_path / "d.toml"
    f.write_text('name = "tdelay"\n[[device]]\nname = "a"\ndelay_ms = 5\n')
    proc = run_halo("testbed", "up", str(f))
    assert proc.returncode == 2 and "no netem" in proc.stderr and "Traceback" not in proc.stderr


@needs_root
def test_three_device_testbed_with_loss(tmp_path):
    """Up (twice), a relaxed generation over real kernel packet loss, down leaves nothing."""
    from halollm.generate import generate
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.keys import cluster_key
    from halollm.runtime.options import ClusterOptions
    from halollm.sampling import SamplingParams
    from halollm.testbed import cluster

    f = tmp_path / "three.toml"
    f.write_text('name = "ttest"\nsubnet = "10.81"\n[[device]]\nname = "pi1"\n'
                 '[[device]]\nname = "pi2"\nloss = 0.05\ncpu = 0.9\n')
    spec = load_spec(f)
    try:
        assert run_halo("testbed", "up", str(f), timeout=300).returncode == 0
        proc = run_halo("testbed", "up", str(f), timeout=300)  # twice is safe
        assert proc.returncode == 0, proc.stderr
        state = cluster.load_state(spec)
        addrs = [(w["address"], int(w["port"])) for w in state["workers"]]
        coord = Coordinator(None, None, addrs, cluster_key(state["key"]),
                            ClusterOptions.build(mode="relaxed", attn_groups=3,
                                                 coordinator_share=0.5,
                                           predictor=None))
        try:
            tok = coord.tokenizer
            res = generate(coord, tok, tok.encode("Once upon a time"), max_tokens=32,
                           sampling=SamplingParams(), ignore_eos=True)
            sync = coord.sync_json()
        finally:
            coord.close()
        assert len(res.token_ids) == 32
        assert sync["lost"] > 0 and sync["received"] > 0  # lost and tolerated
        status = json.loads(run_halo("testbed", "status", str(f), "--json").stdout)
        lossy = next(d for d in status["devices"] if d["device"] == "pi2")
        clean = next(d for d in status["devices"] if d["device"] == "pi1")
        assert lossy["dropped_arriving_at_device"] + lossy["dropped_arriving_at_coordinator"] > 0
        assert clean["dropped_arriving_at_device"] == 0 and lossy["worker_alive"]
    finally:
        proc = run_halo("testbed", "down", str(f))
    assert proc.returncode == 0
    assert cluster.leftovers(spec) == []


@needs_root
def test_down_cleans_up_after_a_crash(tmp_path):
    """Pieces left by a half-finished up (no state file) are still found and removed."""
    from halollm.testbed import cluster, system

    f = tmp_path / "crash.toml"
    f.write_text('name = "tcrash"\nsubnet = "10.82"\n[[device]]\nname = "a"\nloss = 0.1\n')
    spec = load_spec(f)
    cluster.down(spec, quiet=True)  # what an earlier, interrupted run of this test left
    d = spec.devices[0]
    system.sh("ip", "netns", "add", spec.namespace(d))
    system.sh("nft", "-f", "-", input=system.nft_loss_table(spec.table,
                                                             [system.loss_rule("x", 0.1)]))
    assert cluster.leftovers(spec)
    assert run_halo("testbed", "down", str(f)).returncode == 0
    assert cluster.leftovers(spec) == []


def test_demo_json():
    proc = run_halo("demo", "--json", "--max-tokens", "6", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["network"] == ("testbed" if ROOT_TOOLS else "userspace")
    for mode in ("strict", "relaxed"):
        assert out[mode]["decode_ms_per_token"] > 0 and "sync" in out[mode]
        assert len(out[mode]["token_ids"]) == 6
    assert out["strict"]["sync"]["lost"] == 0 and out["strict"]["agreement"] == 1.0
    assert out["speedup"] > 0 and 0 <= out["agreement"] <= 1


@needs_root
def test_live_replan_when_a_link_starts_losing_packets(tmp_path):
    """HALO placement on three reliable devices, the coordinator's memory too small to hold
    the model: the workers carry most groups. Mid-generation one link starts losing 30% of
    its packets (`halo testbed loss`); the scheduler measures it, re-plans, and moves that
    device's groups to the others between tokens. The generation completes."""
    from halollm.generate import generate
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.keys import cluster_key
    from halollm.runtime.options import ClusterOptions
    from halollm.sampling import SamplingParams
    from halollm.testbed import cluster

    f = tmp_path / "replan.toml"
    f.write_text('name = "treplan"\nsubnet = "10.85"\n[[device]]\nname = "a"\n'
                 '[[device]]\nname = "b"\n[[device]]\nname = "c"\n')
    spec = load_spec(f)
    cluster.down(spec, quiet=True)
    try:
        assert run_halo("testbed", "up", str(f), timeout=300).returncode == 0
        state = cluster.load_state(spec)
        addrs = [(w["address"], int(w["port"])) for w in state["workers"]]
        coord = Coordinator(None, None, addrs, cluster_key(state["key"]), ClusterOptions.build(
            # a coordinator budget of 24 MiB holds under half the packed layers: the workers
            # must hold groups (with room for the whole model it would keep them all, as the
            # probe finds workers on one shared machine not worth their round trips)
            placement="halo", memory_budget=24 << 20, predictor=None, replan_every=4))
        raised_at: list[int] = []
        before = coord.placement.summary()["groups_per_device"]
        # the worker the first plan gives most groups (measured speeds vary on a busy machine)
        victim = max(range(1, len(before)), key=lambda d: before[d])
        name = spec.devices[victim - 1].name

        def degrade(_piece: str) -> None:
            # after the first token, before the first re-planning check: the first plan's
            # links are all clean, so what re-planning reacts to is the loss
            if not raised_at:
                proc = run_halo("testbed", "loss", str(f), "--device", name, "--rate", "0.3")
                assert proc.returncode == 0, proc.stderr
                raised_at.append(coord.position)

        try:
            tok = coord.tokenizer
            res = generate(coord, tok, tok.encode("Once upon a time"), max_tokens=48,
                           sampling=SamplingParams(), on_text=degrade, ignore_eos=True)
            sync = coord.sync_json()
        finally:
            coord.close()
        assert len(res.token_ids) == 48
        assert before[victim] > 0  # the victim carried groups at first
        replans = sync["placement"]["replans"]
        assert replans[0]["reason"] == "initial"
        # "accuracy" when the lossy link's expected loss of significance is over the bound
        # (the move need not pay back), else "faster"
        moved = [r for r in replans[1:] if r["reason"] in ("faster", "accuracy")
                 and r["position"] > raised_at[0]]
        assert moved, (replans, sync["placement"]["last_kept"],
                       [w["profile"] for w in sync["workers"]])
        assert moved[0]["groups_per_device"][victim] < before[victim]  # it carries less
        b = sync["workers"][victim - 1]["profile"]
        assert b["miss_rate"] > 0.05 and b["speed_neurons_per_ms"] > 0
        status = json.loads(run_halo("testbed", "status", str(f), "--json").stdout)
        dev_b = next(d for d in status["devices"] if d["device"] == name)
        assert dev_b["loss_in"] == 0.3 and dev_b["dropped_arriving_at_device"] > 0
        assert dev_b["profile"]["speed_neurons_per_ms"] > 0
        bad = run_halo("testbed", "loss", str(f), "--device", "zz", "--rate", "0.1")
        assert bad.returncode == 2 and "no device 'zz'" in bad.stderr
        bad = run_halo("testbed", "loss", str(f), "--device", "b")
        assert bad.returncode == 2 and "--rate" in bad.stderr
    finally:
        run_halo("testbed", "down", str(f))
    assert cluster.leftovers(spec) == []


@pytest.mark.parametrize("args,needle", [
    (["--configs", "strict,fast"], "unknown configuration 'fast'"),
    (["--rates", "0,x"], "--rates must be numbers"),
    (["--rates", "0,0.1"], "--headline-rate 0.05 is not one of --rates"),
    (["--spec", "/nonexistent.toml"], "no such file"),
    (["--data", "/tmp"], "no wikitext-2/wiki.test.raw in it"),
])
def test_bench_paper_bad_arguments(args, needle):
    base = {"--data": str(SHARED_DATA)}
    for k, v in zip(args[::2], args[1::2], strict=True):
        base[k] = v
    proc = run_halo("bench", "paper", *[x for kv in base.items() for x in kv])
    assert needle in one_clear_line(proc)


@needs_root
@pytest.mark.slow
def test_bench_paper_small(tmp_path, predictor_file):
    """`halo bench paper` end to end on a two-worker testbed (one wired, one lossy link),
    tiny workloads: every configuration at every rate, the ablation at the headline rate,
    the loss really applied (the equal split loses contributions at 10%), HALO accurate
    under it, strict exact with nothing lost, and the report, data and plots written."""
    f = tmp_path / "p.toml"
    f.write_text('name = "tpaper"\nsubnet = "10.88"\n[coordinator]\ncpu = 1.0\n'
                 '[[device]]\nname = "wired"\n'
                 'memory = "64MiB"\n[[device]]\nname = "wifi"\nloss = 0.1\nmemory = "64MiB"\n')
    out = tmp_path / "res"
    proc = run_halo("bench", "paper", "--data", str(SHARED_DATA), "--spec", str(f),
                    "--predictor", str(predictor_file[0]), "--rates", "0,0.1",
                    "--headline-rate", "0.1", "--ablations", "halo-no-predictor",
                    "--tokens", "3", "--warmup", "2", "--strict-tokens", "2",
                    "--ppl-tokens", "48", "--piqa-items", "2", "--forced-tokens", "48",
                    "--out", str(out), "--name", "t", "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    rows = {(r["loss"], r["config"]): r for r in res["rows"]}
    assert set(rows) == {(r, c) for r in (0.0, 0.1) for c in ("strict", "relaxed", "halo")} \
        | {(0.1, "halo-no-predictor")}
    assert res["lossy"] == ["wifi"]
    ref = res["reference"]
    assert ref["ppl_tokens"] == 47 and ref["piqa_items"] == 2 and ref["ppl"] > 1
    assert ref["single_device_ms_per_token"] > 0 and ref["coordinator_cpu"] == 1.0
    for (_, name), r in rows.items():
        assert "error" not in r, (r, proc.stderr[-3000:])
        assert r["decode_ms_per_token"] > 0
        if name == "strict":
            assert "agreement" not in r and r["lost"] == 0
        else:
            assert 0 <= r["agreement"] <= 1 and r["piqa_items"] == 2
    assert rows[(0.1, "relaxed")]["lost"] > 0  # the kernel really dropped packets
    halo = rows[(0.1, "halo")]
    assert halo["agreement"] >= 0.9 and abs(halo["ppl"] / ref["ppl"] - 1) < 0.05
    assert res["headline"]["loss"] == 0.1 and res["headline"]["speedup"] > 0
    for name in ("t.md", "t.json", "t_speed.png", "t_accuracy.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "t.md").read_text()
    assert "Headline, at 10% loss" in md and "| 10% | halo-no-predictor |" in md
    assert "One such device alone" in md and "vs one device" in md
    from halollm.testbed.system import cgroup_paths

    assert cgroup_paths("halo-tpaper-coordinator") == []  # released and removed


@needs_root
def test_the_coordinator_is_held_to_its_share(tmp_path):
    """`[coordinator] cpu` puts this process in a CPU-capped cgroup for the body (as each
    device's worker is), and takes it out and removes the cgroup after."""
    import os
    from pathlib import Path

    from halollm.testbed import cluster, system

    spec = parse_spec({"name": "tshare", "coordinator": {"cpu": 0.5},
                       "device": [{"name": "a"}]})
    home = system.cgroup_of(os.getpid())
    with cluster.coordinator_share(spec) as share:
        inside = system.cgroup_of(os.getpid())
        assert share == 0.5 and inside != home and inside.name == "halo-tshare-coordinator"
        quota = inside / "cpu.cfs_quota_us"
        if quota.exists():
            assert int(quota.read_text()) == 50_000
        else:
            assert (inside / "cpu.max").read_text().split()[0] == "50000"
        assert str(os.getpid()) in (inside / "cgroup.procs").read_text().split()
    assert system.cgroup_of(os.getpid()) == home
    assert not Path(inside).exists()
    without = parse_spec({"name": "tshare", "device": [{"name": "a"}]})
    with cluster.coordinator_share(without) as share:
        assert share is None and system.cgroup_of(os.getpid()) == home


def test_bench_paper_report_keeps_failed_and_partial_runs(tmp_path):
    """A configuration that cannot run (e.g. no placement fits the budgets) is a row of the
    report, not a crash; an interrupted run says it is partial; no headline without HALO."""
    import argparse
    from pathlib import Path

    from halollm.bench import paper_report

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "paper.toml")
    ref = {"ppl": 30.0, "ppl_tokens": 255, "fixed_tokens": 209, "piqa_acc": 0.5,
           "piqa_items": 2}
    rows = [{"loss": 0.05, "config": "strict", "decode_ms_per_token": 900.0,
             "decode_ms_p95": 950.0, "lost": 0, "expected": 10, "groups_per_device": [1, 1],
             "replans": 0},
            {"loss": 0.05, "config": "halo", "error": "no placement satisfies the constraints"}]
    args = argparse.Namespace(spec="examples/paper.toml", memory_budget="64MiB", model=None,
                              tokens=4, warmup=2, strict_tokens=2, name="p", out=tmp_path,
                              json=False, headline_rate=0.05)
    paper_report.write(args, spec, ["wifi1"], ref, rows, {"strict": "s", "halo": "h"},
                       partial=True)
    md = (tmp_path / "p.md").read_text()
    assert "| 5% | halo | failed: no placement satisfies the constraints |" in md
    assert "Interrupted: a partial result" in md and "Headline" not in md
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["partial"] is True and data["headline"] is None
    assert (tmp_path / "p_speed.png").stat().st_size > 0
