"""Discovery: the service records (pure, anywhere) and real workers announcing themselves
with mDNS from the testbed's network namespaces (root): three found and used by `halo run
--discover`, a fourth with another cluster's key skipped with its reason, a worker that
disappears no longer found."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from halollm.runtime.discovery_records import (
    SERVICE_TYPE,
    Announced,
    instance_name,
    merge,
    parse_service,
    pick_host,
    txt_record,
)
from halollm.testbed.system import unavailable
from tests.conftest import run_halo

HASH = "0123456789abcdef" * 4
needs_root = pytest.mark.skipif(bool(unavailable()),
                                reason=f"{unavailable()}; CI runs it as root")


def _record(**over: object) -> dict[bytes, bytes]:
    props = {k.encode(): v.encode() for k, v in txt_record("m.gguf", HASH, 1 << 30).items()}
    props.update({k.encode(): str(v).encode() for k, v in over.items()})
    return props


def test_a_record_round_trips_and_holds_no_key_material():
    txt = txt_record("model.gguf", HASH, 512 << 20)
    assert set(txt) == {"v", "model", "hash", "mem"}  # address, model, memory: nothing else
    name = instance_name("pi", "10.0.0.2", 7000)
    props = {k.encode(): v.encode() for k, v in txt.items()}
    a = parse_service(name, ["10.0.0.2"], 7000, props)
    assert a == Announced(name[:-len(SERVICE_TYPE) - 1], "10.0.0.2", 7000, "model.gguf",
                          HASH[:16], 512 << 20)
    assert a.same_model(HASH) and not a.same_model("f" * 64)
    assert "512 MiB" in a.describe()


@pytest.mark.parametrize("change", [
    {"name": "halo-x._http._tcp.local."},  # another service type
    {"props": {"v": "9"}},  # a layout this version does not know
    {"props": {"hash": "not-hex-at-all!!"}},
    {"props": {"hash": "abc"}},
    {"addresses": ["fe80::1"]},  # no IPv4 address
    {"addresses": []},
    {"port": 0},
    {"port": None},
])
def test_stray_or_hostile_records_are_skipped(change):
    name = change.get("name", instance_name("pi", "10.0.0.2", 7000))
    props = _record(**change.get("props", {}))
    assert parse_service(name, change.get("addresses", ["10.0.0.2"]),
                         change.get("port", 7000), props) is None


def test_addresses_names_and_merging():
    assert pick_host(["127.0.0.1", "fe80::1", "192.168.1.5"]) == "192.168.1.5"
    assert pick_host(["127.0.0.1"]) == "127.0.0.1"
    assert pick_host(["::1", "nonsense"]) is None
    a, b = instance_name("box", "10.0.1.2", 7000), instance_name("box", "10.0.2.2", 7000)
    assert a != b and a.endswith("." + SERVICE_TYPE)
    assert len(instance_name("x" * 100, "10.0.0.2", 7000).split(".")[0]) <= 63
    found = [Announced("w2", "10.0.0.3", 7000, "m", HASH[:16], None),
             Announced("w1", "10.0.0.2", 7000, "m", HASH[:16], None)]
    assert merge([("10.0.0.3", 7000), ("10.0.0.9", 7000)], found) == [
        ("10.0.0.3", 7000), ("10.0.0.9", 7000), ("10.0.0.2", 7000)]


def test_discover_options_are_checked_before_anything_starts():
    proc = run_halo("run", "Hello", "--discover", "--local", "2", timeout=60)
    assert proc.returncode == 2 and "--discover goes with --workers" in proc.stderr
    proc = run_halo("run", "Hello", timeout=60)
    assert proc.returncode == 2 and "--discover" in proc.stderr
    assert "Traceback" not in proc.stderr


def _wait_for_line(path: Path, needle: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        if time.monotonic() > end:
            pytest.fail(f"{path.name} never said {needle!r}: {path.read_text()[-400:]}")
        time.sleep(0.1)


def _stop(pid: int, sig: int = signal.SIGTERM) -> None:
    os.kill(pid, sig)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return
        time.sleep(0.05)


@needs_root
@pytest.mark.slow
def test_workers_in_namespaces_are_discovered(tmp_path):
    from halollm.runtime.discovery import browse
    from halollm.testbed import cluster
    from halollm.testbed.spec import load_spec

    f = tmp_path / "disc.toml"
    f.write_text('name = "tdisc"\nsubnet = "10.84"\n' + "".join(
        f'[[device]]\nname = "w{i}"\n' for i in range(1, 5)))
    spec = load_spec(f)
    addr = [f"{spec.device_address(d)}:{spec.port}" for d in spec.devices]
    on = ",".join(spec.coordinator_address(d) for d in spec.devices)
    try:
        state = cluster.up(spec, threads=1, log=lambda _m: None)
        # the fourth device's worker belongs to another cluster: restarted with another key
        w4, d4 = state["workers"][3], spec.devices[3]
        _stop(w4["pid"])
        log4 = tmp_path / "w4.log"
        with log4.open("w") as out:
            subprocess.Popen(["ip", "netns", "exec", spec.namespace(d4), sys.executable, "-m",
                              "halollm.cli.main", "worker", "--listen", addr[3], "--threads",
                              "1"], env={**os.environ, "HALO_KEY": "another cluster's key"},
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        for w in state["workers"][:3]:
            _wait_for_line(Path(w["log"]), "announced as")
        _wait_for_line(log4, "announced as")

        proc = run_halo("run", "The capital of France is", "--discover", "--discover-on", on,
                        "--key", state["key"], "--max-tokens", "4", "--predictor", "none",
                        "--json", env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        used = [w["address"] for w in json.loads(proc.stdout)["sync"]["workers"]]
        assert sorted(used) == sorted(addr[:3])
        assert f"skipped {addr[3]}" in proc.stderr and "wrong cluster key" in proc.stderr
        assert "Traceback" not in proc.stderr

        _stop(state["workers"][0]["pid"], signal.SIGKILL)  # gone without a goodbye
        found = {f"{a.host}:{a.port}" for a in browse(2.0, on.split(","))}
        assert found == set(addr[1:])
    finally:
        cluster.down(spec, quiet=True)
