"""`halo bench peer`, the processes: every peer and HALO command runs as a child in its own
session with a time limit (killed with its group on expiry or Ctrl-C), optionally inside a
CPU-capped cgroup (written from the child before it execs, so it never runs uncapped), and
optionally inside a testbed device's network namespace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from halollm.errors import HaloError
from halollm.runtime.keys import ENV
from halollm.testbed import cluster, system
from halollm.testbed.spec import Spec

DLLAMA_PORT = 9990  # dllama's own default worker port
ROOT_CGROUP = "halo-peer-root"  # the dllama root, the HALO coordinator, single-device runs


def _enter(cgroup: Path | None) -> Any:
    if cgroup is None:
        return None
    procs = cgroup / "cgroup.procs"

    def join() -> None:  # runs in the child between fork and exec
        procs.write_text(str(os.getpid()))
    return join


def run_limited(cmd: list[str], timeout: float, cgroup: Path | None = None,
                env: dict[str, str] | None = None) -> str:
    """Run `cmd` to completion within `timeout` seconds; its stdout (stderr joined). On
    expiry, a non-zero exit or Ctrl-C the whole process group is killed; the first two
    raise HaloError with the output's tail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, preexec_fn=_enter(cgroup))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise HaloError(f"`{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''}` did not "
                        f"finish in {timeout:.0f}s (killed)") from None
    except BaseException:
        kill_group(proc)
        raise
    if proc.returncode != 0:
        tail = " | ".join(out.strip().splitlines()[-4:])
        raise HaloError(f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:3]))}"
                        f" …` exited with {proc.returncode}: {tail}")
    return out


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the child's process group, SIGKILL it after 3 s."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def root_cgroup(share: float | None) -> Path | None:
    return None if share is None else system.cgroup_create(ROOT_CGROUP, share)


def remove_root_cgroup() -> None:
    for path in system.cgroup_paths(ROOT_CGROUP):
        system.cgroup_remove_soon(path, 30)


class DllamaWorkers:
    """`dllama worker` processes inside the first `count` devices' namespaces, each in its
    device's cgroup (the one the testbed made for the device's `halo worker`: one node, one
    CPU share; only one of the two computes at a time)."""

    def __init__(self, dllama: Path, spec: Spec, count: int, log_dir: Path,
                 net_turbo: bool = False) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.addresses = []
        try:
            for d in spec.devices[:count]:
                cg = system.cgroup_paths(cluster.cgroup_name(spec, d)) if d.cpu else []
                log = open(log_dir / f"dllama-{d.name}.log", "w")  # noqa: SIM115
                self.procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", spec.namespace(d), *_line_buffered(), str(dllama),
                     "worker",
                     "--port", str(DLLAMA_PORT), "--nthreads", "1",
                     "--net-turbo", str(int(net_turbo))],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_enter(cg[0] if cg else None)))
                log.close()
                self.addresses.append(f"{spec.device_address(d)}:{DLLAMA_PORT}")
            self._wait_listening(log_dir, spec, count)
        except BaseException:
            self.close()
            raise

    def _wait_listening(self, log_dir: Path, spec: Spec, count: int) -> None:
        """Until every worker's port is open (asked of the namespace's sockets with `ss`:
        dllama's own 'Listening on' line sits in its stdio buffer, and a probing connection
        would be taken for the root's)."""
        end = time.monotonic() + 60
        for d, proc in zip(spec.devices[:count], self.procs, strict=True):
            while not system.sh("ss", "-ltnH", f"sport = :{DLLAMA_PORT}",
                                ns=spec.namespace(d), check=False).stdout.strip():
                if proc.poll() is not None or time.monotonic() > end:
                    log = log_dir / f"dllama-{d.name}.log"
                    raise HaloError(f"dllama worker on {d.name} did not start: "
                                    + log.read_text(errors="replace").strip()[-300:])
                time.sleep(0.1)

    def close(self) -> None:
        for p in self.procs:
            kill_group(p)
        self.procs = []


def _line_buffered() -> list[str]:
    """`stdbuf -oL` where coreutils has it, so a worker's log is current."""
    return ["stdbuf", "-oL"] if shutil.which("stdbuf") else []


def enable_forwarding(spec: Spec) -> str:
    """dllama's workers talk to each other too (a full mesh), so each device namespace gets
    a route to the others through the host, which forwards between the veths (the packets
    cross both devices' lossy links, as through a Wi-Fi access point). Returns the host's
    previous ip_forward setting, for `restore_forwarding`."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text().strip()
    path.write_text("1")
    for d in spec.devices:
        system.sh("ip", "route", "replace", f"{spec.subnet}.0.0/16", "via",
                  spec.coordinator_address(d), ns=spec.namespace(d))
    return before


def restore_forwarding(before: str) -> None:
    Path("/proc/sys/net/ipv4/ip_forward").write_text(before)


def dllama_root(dllama: Path, model: Path, tokenizer: Path, workers: list[str], prompt: str,
                tokens: int, timeout: float, cgroup: Path | None, net_turbo: bool = False
                ) -> str:
    """One `dllama inference` run (this namespace, the root node); its stdout. --steps
    counts the prompt's tokens too: this tokenizer conversion is one token per character at
    most (see docs/peer.md), so len(prompt) - 1 + tokens predicts at least `tokens`."""
    cmd = [str(dllama), "inference", "--model", str(model), "--tokenizer", str(tokenizer),
           "--buffer-float-type", "q80", "--nthreads", "1", "--prompt", prompt,
           "--steps", str(len(prompt.encode()) - 1 + tokens), "--temperature", "0",
           "--seed", "1", "--net-turbo", str(int(net_turbo))]
    if workers:
        cmd += ["--workers", *workers]
    return run_limited(cmd, timeout, cgroup)


def halo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "halollm.cli.main", *args]


def halo_json(cmd: list[str], timeout: float, cgroup: Path | None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    out = run_limited(cmd, timeout, cgroup, {**os.environ, **(env or {})})
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise HaloError(f"`halo {cmd[3]}` printed no JSON: {out.strip()[-300:]}")


def halo_cluster(model: str, quant: str, addrs: list[str], key: str, mode: tuple[str, str],
                 prompt: str, tokens: int, timeout: float, cgroup: Path | None
                 ) -> dict[str, Any]:
    """`halo run` over the given workers, one coordinator thread, 4-bit weights."""
    sync, placement = mode
    cmd = halo_cmd("run", prompt, "--model", model, "--quant", quant, "--workers",
                   ",".join(addrs), "--sync", sync, "--placement", placement,
                   "--max-tokens", str(tokens), "--ignore-eos", "--threads", "1", "--json")
    return halo_json(cmd, timeout, cgroup, {ENV: key})


def halo_single(model: str | None, quant: str | None, prompt: str, tokens: int,
                threads: int, timeout: float, cgroup: Path | None) -> dict[str, Any]:
    """`halo generate` on this device alone; torch's threads set through OMP_NUM_THREADS
    (what torch reads at start)."""
    cmd = halo_cmd("generate", prompt, "--max-tokens", str(tokens), "--ignore-eos", "--json")
    if model:
        cmd += ["--model", model]
    if quant:
        cmd += ["--quant", quant]
    return halo_json(cmd, timeout, cgroup, {"OMP_NUM_THREADS": str(threads)})
