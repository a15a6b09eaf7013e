"""Bring a testbed up, report on it, and tear it down — everything found again by name.

Layout: the coordinator stays in the namespace it runs in (the host's); every device gets a
network namespace `<name>-<device>` joined to it by a veth pair `h<name><i>c` (host side,
10.x.i.1) / `h<name><i>d` (device side, 10.x.i.2). Loss is an nftables table `halo_<name>`
with a random-drop rule per interface at the prerouting hook, i.e. where packets *arrive*,
at both ends. Bandwidth is `tc tbf` on both ends; CPU share a cgroup quota. A worker runs
inside each namespace; its log and the cluster key live in /run/halo/<name>/ (root only).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from halollm.errors import HaloError
from halollm.runtime.keys import ENV, key_text
from halollm.testbed import system
from halollm.testbed.spec import Device, Spec

STATE_ROOT = Path(os.environ.get("HALO_TESTBED_STATE", "/run/halo"))


def state_dir(spec: Spec) -> Path:
    return STATE_ROOT / spec.name


def cgroup_name(spec: Spec, d: Device) -> str:
    return f"halo-{spec.name}-{d.name}"


@contextlib.contextmanager
def coordinator_share(spec: Spec) -> Iterator[float | None]:
    """Hold this process -- the coordinator -- to the spec's `[coordinator] cpu` share for
    the body, as every device is held to its own, so that a cluster of N Pi-class nodes adds
    up to no more than N of them and can be compared with one such node. Yields the share
    (None: no `cpu` in the spec, the coordinator runs at this machine's speed)."""
    if spec.coordinator_cpu is None:
        yield None
        return
    pid = os.getpid()
    home = system.cgroup_of(pid)
    path = hold_coordinator(spec)
    try:
        yield spec.coordinator_cpu
    finally:
        system.cgroup_move(pid, home)
        system.cgroup_remove(path)


def coordinator_cgroup(spec: Spec) -> str:
    return f"halo-{spec.name}-coordinator"


def hold_coordinator(spec: Spec) -> Path:
    """Move this process into the coordinator's CPU-capped cgroup for good (`halo run
    --testbed`: the cgroup is removed by `halo testbed down` once the process has ended)."""
    assert spec.coordinator_cpu is not None
    path = system.cgroup_create(coordinator_cgroup(spec), spec.coordinator_cpu)
    system.cgroup_move(os.getpid(), path)
    return path


def up(spec: Spec, model: str | None = None, key: str | None = None, threads: int = 1,
       log: Any = None, startup_timeout: float = 180.0) -> dict[str, Any]:
    """Create the network, start one worker per device; returns the state (addresses, key)."""
    say = log or (lambda msg: print(f"[testbed] {msg}", file=sys.stderr, flush=True))
    need_tc = any(d.bandwidth_bps or d.delay_ms for d in spec.devices)
    system.preflight(need_tc)
    if any(d.delay_ms or d.jitter_ms for d in spec.devices) and not system.netem_available():
        raise HaloError("this kernel has no netem qdisc (sch_netem), so delay_ms/jitter_ms "
                        "cannot be emulated; remove them from the spec")
    if down(spec, quiet=True):
        say("removed leftovers of an earlier run")
    text, _ = key_text(key)
    sdir = state_dir(spec)
    sdir.mkdir(parents=True, exist_ok=True)
    os.chmod(sdir, 0o700)
    try:
        _network(spec)
        state = _workers(spec, text, model, threads, sdir, startup_timeout)
    except BaseException:
        down(spec, quiet=True)
        raise
    (sdir / "state.json").write_text(json.dumps(state, indent=2))
    os.chmod(sdir / "state.json", 0o600)
    say(f"up: {len(spec.devices)} devices, workers at "
        + ", ".join(f"{w['address']}:{w['port']}" for w in state["workers"]))
    return state


def _network(spec: Spec) -> None:
    host_rules = []
    for d in spec.devices:
        ns = spec.namespace(d)
        vc, vd = spec.veth(d)
        system.sh("ip", "netns", "add", ns)
        system.sh("ip", "link", "add", vc, "type", "veth", "peer", "name", vd, "netns", ns)
        system.sh("ip", "addr", "add", f"{spec.coordinator_address(d)}/24", "dev", vc)
        system.sh("ip", "link", "set", vc, "up")
        system.sh("ip", "link", "set", "lo", "up", ns=ns)
        system.sh("ip", "addr", "add", f"{spec.device_address(d)}/24", "dev", vd, ns=ns)
        system.sh("ip", "link", "set", vd, "up", ns=ns)
        if d.loss_in > 0:
            system.sh("nft", "-f", "-", ns=ns, input=system.nft_loss_table(
                spec.table, [system.loss_rule(vd, d.loss_in)]))
        if d.loss_out > 0:
            host_rules.append(system.loss_rule(vc, d.loss_out))
        if d.bandwidth_bps:
            burst = max(16_000, d.bandwidth_bps // 8 // 100)
            for iface, where in ((vc, None), (vd, ns)):
                system.sh("tc", "qdisc", "add", "dev", iface, "root", "tbf", "rate",
                          f"{d.bandwidth_bps}bit", "burst", str(burst), "latency", "100ms",
                          ns=where)
        elif d.delay_ms:
            for iface, where in ((vc, None), (vd, ns)):
                jitter = [f"{d.jitter_ms}ms"] if d.jitter_ms else []
                system.sh("tc", "qdisc", "add", "dev", iface, "root", "netem", "delay",
                          f"{d.delay_ms / 2}ms", *jitter, ns=where)
    if host_rules:
        system.sh("nft", "-f", "-", input=system.nft_loss_table(spec.table, host_rules))


def _workers(spec: Spec, key: str, model: str | None, threads: int, sdir: Path,
             timeout: float) -> dict[str, Any]:
    workers = []
    procs = []
    for d in spec.devices:
        cmd = ["ip", "netns", "exec", spec.namespace(d), sys.executable, "-m",
               "halollm.cli.main", "worker", "--listen", f"{spec.device_address(d)}:{spec.port}",
               "--threads", str(threads), "--status-file", str(sdir / f"{d.name}.status.json")]
        if d.memory_bytes:
            cmd += ["--memory-budget", str(d.memory_bytes)]
        if model:
            cmd += ["--model", str(model)]
        logf = open(sdir / f"{d.name}.log", "w")  # noqa: SIM115 (kept by the child)
        proc = subprocess.Popen(cmd, env={**os.environ, ENV: key}, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        cgroup = None
        if d.cpu is not None:
            path = system.cgroup_create(cgroup_name(spec, d), d.cpu)
            (path / "cgroup.procs").write_text(str(proc.pid))
            cgroup = str(path)
        procs.append((d, proc))
        workers.append({"device": d.name, "namespace": spec.namespace(d), "pid": proc.pid,
                        "address": spec.device_address(d), "port": spec.port,
                        "cgroup": cgroup, "log": str(sdir / f"{d.name}.log")})
    end = time.monotonic() + timeout
    for d, proc in procs:
        logp = sdir / f"{d.name}.log"
        while True:
            if "halo worker listening" in logp.read_text(errors="replace"):
                break
            if proc.poll() is not None:
                raise HaloError(f"the worker of device {d.name} exited during startup: "
                                f"{logp.read_text(errors='replace').strip()[-400:]}")
            if time.monotonic() > end:
                raise HaloError(f"the worker of device {d.name} did not start in {timeout:.0f}s")
            time.sleep(0.1)
    return {"name": spec.name, "key": key, "workers": workers}


def set_loss(spec: Spec, device: str, loss_in: float, loss_out: float) -> None:
    """Change one device's packet loss while the testbed runs (a link that starts losing
    packets, or recovers): its nftables rules are replaced, the other devices' kept."""
    names = [d.name for d in spec.devices]
    if device not in names:
        raise HaloError(f"no device {device!r} in {spec.name} (devices: {', '.join(names)})")
    for rate in (loss_in, loss_out):
        if not 0.0 <= rate < 1.0:
            raise HaloError(f"a loss rate must be in [0, 1) (got {rate})")
    state = load_state(spec)
    losses = state.setdefault("loss", {})
    losses[device] = [loss_in, loss_out]
    host_rules = []
    for d in spec.devices:
        lin, lout = losses.get(d.name, [d.loss_in, d.loss_out])
        vc, vd = spec.veth(d)
        if d.name == device:
            ns = spec.namespace(d)
            if system.nft_table_exists(spec.table, ns):
                system.sh("nft", "delete", "table", "inet", spec.table, ns=ns)
            if lin > 0:
                system.sh("nft", "-f", "-", ns=ns, input=system.nft_loss_table(
                    spec.table, [system.loss_rule(vd, lin)]))
        if lout > 0:
            host_rules.append(system.loss_rule(vc, lout))
    if system.nft_table_exists(spec.table):
        system.sh("nft", "delete", "table", "inet", spec.table)
    if host_rules:
        system.sh("nft", "-f", "-", input=system.nft_loss_table(spec.table, host_rules))
    path = state_dir(spec) / "state.json"
    path.write_text(json.dumps(state, indent=2))


def load_state(spec: Spec) -> dict[str, Any]:
    path = state_dir(spec) / "state.json"
    if not path.is_file():
        raise HaloError(f"testbed '{spec.name}' is not up (run: halo testbed up SPEC)")
    return json.loads(path.read_text())


def _kill_namespace_processes(ns: str) -> None:
    out = system.sh("ip", "netns", "pids", ns, check=False).stdout.split()
    pids = [int(p) for p in out if p.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()
                    and "Z" not in _proc_state(p)]
            time.sleep(0.05)
        if not pids:
            return


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (OSError, IndexError):
        return "Z"


def down(spec: Spec, quiet: bool = False) -> list[str]:
    """Remove everything this spec's testbed may have made, by name; returns what it found."""
    removed = []
    existing = system.namespaces() if os.geteuid() == 0 else set()
    for d in spec.devices:
        ns = spec.namespace(d)
        if ns in existing:
            _kill_namespace_processes(ns)
            system.sh("ip", "netns", "del", ns, check=False)
            removed.append(f"namespace {ns}")
        vc, _ = spec.veth(d)
        if system.link_exists(vc):
            system.sh("ip", "link", "del", vc, check=False)
            removed.append(f"interface {vc}")
        for path in system.cgroup_paths(cgroup_name(spec, d)):
            procs = (path / "cgroup.procs").read_text().split()
            for pid in procs:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            system.cgroup_remove_soon(path, 50)
            removed.append(f"cgroup {path}")
    for path in system.cgroup_paths(coordinator_cgroup(spec)):
        try:  # empty once the `halo run --testbed` it held has ended
            system.cgroup_remove(path)
            removed.append(f"cgroup {path}")
        except HaloError:
            pass
    if system.nft_table_exists(spec.table):
        system.sh("nft", "delete", "table", "inet", spec.table, check=False)
        removed.append(f"nftables table {spec.table}")
    sdir = state_dir(spec)
    if sdir.is_dir():
        for f in sdir.iterdir():
            f.unlink()
        sdir.rmdir()
        removed.append(f"state {sdir}")
    if not quiet:
        print(f"[testbed] down: removed {len(removed)} items" +
              (": " + ", ".join(removed) if removed else ""), file=sys.stderr)
    return removed


def leftovers(spec: Spec) -> list[str]:
    """What of this testbed still exists (empty after a clean `down`)."""
    left = []
    existing = system.namespaces()
    for d in spec.devices:
        if spec.namespace(d) in existing:
            left.append(f"namespace {spec.namespace(d)}")
        for iface in spec.veth(d):
            if system.link_exists(iface):
                left.append(f"interface {iface}")
        left += [f"cgroup {p}" for p in system.cgroup_paths(cgroup_name(spec, d))]
    if system.nft_table_exists(spec.table):
        left.append(f"nftables table {spec.table}")
    return left


def _worker_status(state: dict[str, Any], device: str) -> dict[str, Any] | None:
    """What the device's worker measured of itself (compute speed, memory budget, counters),
    from the status file it keeps."""
    for w in state.get("workers", []):
        if w["device"] == device:
            path = Path(w["log"]).with_suffix(".status.json")
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return None
    return None


def status(spec: Spec) -> dict[str, Any]:
    existing = system.namespaces()
    host_drops = system.nft_counters(spec.table)
    state = {}
    try:
        state = load_state(spec)
    except HaloError:
        pass
    pids = {w["device"]: w["pid"] for w in state.get("workers", [])}
    devices = []
    for d in spec.devices:
        ns = spec.namespace(d)
        vc, vd = spec.veth(d)
        up_ = ns in existing
        pid = pids.get(d.name)
        devices.append({
            "device": d.name, "namespace": ns if up_ else None,
            "address": f"{spec.device_address(d)}:{spec.port}",
            "worker_alive": bool(pid and Path(f"/proc/{pid}").exists()
                                 and _proc_state(pid) != "Z"),
            "loss_in": state.get("loss", {}).get(d.name, [d.loss_in, d.loss_out])[0],
            "loss_out": state.get("loss", {}).get(d.name, [d.loss_in, d.loss_out])[1],
            "dropped_arriving_at_device": system.nft_counters(spec.table, ns).get(vd, 0)
            if up_ else 0,
            "dropped_arriving_at_coordinator": host_drops.get(vc, 0),
            "bandwidth_bps": d.bandwidth_bps, "cpu": d.cpu, "memory_bytes": d.memory_bytes,
            "profile": _worker_status(state, d.name)})
    return {"name": spec.name, "up": bool(state), "devices": devices}
