"""Thin wrappers over the Linux tools the testbed drives: ip, nft, tc and cgroups."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from halollm.errors import HaloError

CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")


def sh(*cmd: str, ns: str | None = None, input: str | None = None, check: bool = True
       ) -> subprocess.CompletedProcess[str]:
    """Run a command (inside network namespace `ns` if given); HaloError on failure."""
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise HaloError(f"`{' '.join(full)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def unavailable(need_tc: bool = False) -> str:
    """Why the kernel testbed cannot run here ('' when it can): it needs root, `ip` and
    `nft` (and `tc` for bandwidth or delay)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the testbed needs root (network namespaces, nftables, cgroups)")
    tools = {"ip": "iproute2", "nft": "nftables"}
    if need_tc:
        tools["tc"] = "iproute2"
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` is not installed (Debian/Ubuntu: apt-get install {package})")
    return "; ".join(problems)


def preflight(need_tc: bool) -> None:
    """Explain what is missing before touching anything."""
    why = unavailable(need_tc)
    if why:
        if os.geteuid() != 0:
            why += "; run it as root, or use `halo demo`, which falls back to user-space loss"
        raise HaloError(why)


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (delay/jitter), probed in a scratch namespace."""
    ns = f"halo-probe-{os.getpid()}"
    if sh("ip", "netns", "add", ns, check=False).returncode != 0:
        return False
    try:
        sh("ip", "link", "set", "lo", "up", ns=ns, check=False)
        return sh("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", ns=ns,
                  check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


def namespaces() -> set[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return sh("ip", "link", "show", name, check=False).returncode == 0


def nft_table_exists(table: str, ns: str | None = None) -> bool:
    return sh("nft", "list", "table", "inet", table, ns=ns, check=False).returncode == 0


def loss_rule(iface: str, rate: float) -> str:
    """An nftables rule dropping `rate` of the IP packets arriving on iface, at random."""
    k = round(rate * 1_000_000)
    return f'iifname "{iface}" numgen random mod 1000000 < {k} counter drop'


def nft_loss_table(table: str, rules: list[str]) -> str:
    body = "\n".join(f"    {r}" for r in rules)
    return (f"table inet {table} {{\n  chain prerouting {{\n    type filter hook prerouting "
            f"priority -300; policy accept;\n{body}\n  }}\n}}\n")


def nft_counters(table: str, ns: str | None = None) -> dict[str, int]:
    """Packets dropped per interface by a loss table (from its rule counters)."""
    import json

    proc = sh("nft", "-j", "list", "table", "inet", table, ns=ns, check=False)
    if proc.returncode != 0:
        return {}
    out: dict[str, int] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        iface, packets = None, 0
        for expr in rule.get("expr", []):
            match = expr.get("match")
            if match and match.get("left", {}).get("meta", {}).get("key") == "iifname":
                iface = match.get("right")
            if "counter" in expr:
                packets = int(expr["counter"].get("packets", 0))
        if iface:
            out[str(iface)] = packets
    return out


def cgroup_create(name: str, cpu: float) -> Path:
    """A CPU-capped cgroup (v1 `cpu` controller, else v2) allowing `cpu` cores."""
    period = 100_000
    quota = max(1000, int(cpu * period))
    if CGROUP_V1_CPU.is_dir() and (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        path = CGROUP_V1_CPU / name
        path.mkdir(exist_ok=True)
        (path / "cpu.cfs_period_us").write_text(str(period))
        (path / "cpu.cfs_quota_us").write_text(str(quota))
        return path
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.is_file() and "cpu" in controllers.read_text().split():
        (CGROUP_V2 / "cgroup.subtree_control").write_text("+cpu")
        path = CGROUP_V2 / name
        path.mkdir(exist_ok=True)
        (path / "cpu.max").write_text(f"{quota} {period}")
        return path
    raise HaloError("no cgroup CPU controller found (neither v1 cpu nor v2 with cpu enabled); "
                    "remove the cpu settings from the spec")


def cgroup_paths(name: str) -> list[Path]:
    return [p for p in (CGROUP_V1_CPU / name, CGROUP_V2 / name) if p.is_dir()]


def cgroup_remove(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        raise HaloError(f"cannot remove cgroup {path}: {exc.strerror}") from exc


def cgroup_remove_soon(path: Path, attempts: int) -> bool:
    """Remove a cgroup whose processes are exiting: retried every 0.1 s, at most `attempts`
    times (the kernel refuses while a dying process is still in it). True if removed."""
    for _ in range(attempts):
        try:
            cgroup_remove(path)
            return True
        except HaloError:
            time.sleep(0.1)
    return False


def cgroup_of(pid: int) -> Path:
    """The CPU cgroup a process is in now (v1 `cpu` controller, else v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "cpu" in controllers.split(",") and CGROUP_V1_CPU.is_dir():
            return CGROUP_V1_CPU / rel.lstrip("/")
        if controllers == "" and not (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
            return CGROUP_V2 / rel.lstrip("/")
    raise HaloError(f"cannot tell the CPU cgroup of process {pid}")


def cgroup_move(pid: int, path: Path) -> None:
    """Move a process (all its threads) into a cgroup."""
    (path / "cgroup.procs").write_text(str(pid))
