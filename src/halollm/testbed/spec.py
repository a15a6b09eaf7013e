"""The cluster spec file: which devices exist and how their links and CPUs behave.

TOML, for example::

    name = "demo"                 # prefix of every namespace, interface, table and cgroup
    subnet = "10.77"              # device i gets 10.77.i.2, the coordinator's side 10.77.i.1
    port = 7000                   # workers listen on this port

    [coordinator]
    cpu = 0.25                    # optional: CPU share of the coordinator (a cgroup quota
                                  # while `halo bench paper` and `halo run --testbed` run)

    [[device]]
    name = "pi1"
    loss = 0.05                   # packet loss each direction (or loss_in / loss_out)
    bandwidth = "100mbit"         # optional, tc tbf on both ends
    cpu = 0.5                     # optional, fraction of one core (cgroup quota)
    memory = "512MiB"             # optional, the device's memory budget

Validation is strict: an unknown key (a typo) or an impossible value is refused with the
device and key named.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halollm.errors import HaloError

_TOP_KEYS = {"name", "subnet", "port", "coordinator", "device"}
_COORD_KEYS = {"cpu", "memory"}
_DEVICE_KEYS = {"name", "loss", "loss_in", "loss_out", "bandwidth", "delay_ms", "jitter_ms",
                "cpu", "memory"}
_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|kib|mib|gib)?$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
               "gib": 2**30}
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


@dataclass(frozen=True)
class Device:
    name: str
    index: int  # 1-based: addresses 10.x.index.2
    loss_in: float = 0.0  # share of packets lost arriving at the device
    loss_out: float = 0.0  # share of packets lost arriving at the coordinator from it
    bandwidth_bps: int | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    cpu: float | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Spec:
    name: str
    subnet: str
    port: int
    devices: tuple[Device, ...]
    coordinator_cpu: float | None = None
    path: Path | None = None

    def device_address(self, d: Device) -> str:
        return f"{self.subnet}.{d.index}.2"

    def coordinator_address(self, d: Device) -> str:
        return f"{self.subnet}.{d.index}.1"

    def namespace(self, d: Device) -> str:
        return f"{self.name}-{d.name}"

    def veth(self, d: Device) -> tuple[str, str]:
        """(coordinator-side, device-side) interface names (<= 15 characters)."""
        return f"h{self.name[:5]}{d.index}c", f"h{self.name[:5]}{d.index}d"

    @property
    def table(self) -> str:
        return f"halo_{self.name}"


def _unknown(keys: set[str], allowed: set[str], where: str) -> None:
    for key in sorted(keys - allowed):
        near = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        allowed_list = ", ".join(sorted(allowed))
        raise HaloError(f"{where}: unknown key '{key}'{hint}; allowed: {allowed_list}")


def _share(value: Any, where: str, upper: float = 1.0, inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HaloError(f"{where} must be a number (got {value!r})")
    v = float(value)
    ok = 0.0 <= v <= upper if inclusive else 0.0 <= v < upper
    if not ok:
        raise HaloError(f"{where} must be in [0, {upper}{']' if inclusive else ')'} (got {v})")
    return v


def parse_rate(text: Any, where: str) -> int:
    m = _RATE.match(str(text).strip())
    if not m:
        raise HaloError(f"{where}: bandwidth '{text}' is not like '100mbit' "
                        "(units: bit, kbit, mbit, gbit)")
    bps = int(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    if bps < 8000:
        raise HaloError(f"{where}: bandwidth {text} is too low (at least 8kbit)")
    return bps


def parse_size(text: Any, where: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE.match(str(text).strip())
        if not m:
            raise HaloError(f"{where}: size '{text}' is not like '512MiB' (units: B, KB, MB, "
                            "GB, KiB, MiB, GiB)")
        n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    if n <= 0:
        raise HaloError(f"{where}: size must be positive")
    return n


def parse_spec(data: dict[str, Any], path: Path | None = None) -> Spec:
    where = str(path or "spec")
    _unknown(set(data), _TOP_KEYS, where)
    name = str(data.get("name", "halo"))
    if not _NAME.match(name):
        raise HaloError(f"{where}: name '{name}' must be 1-8 lowercase letters/digits, "
                        "starting with a letter")
    subnet = str(data.get("subnet", "10.77"))
    parts = subnet.split(".")
    if len(parts) != 2 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise HaloError(f"{where}: subnet '{subnet}' must be two octets like '10.77'")
    port = data.get("port", 7000)
    if not isinstance(port, int) or not 1024 <= port <= 65535:
        raise HaloError(f"{where}: port must be an integer in 1024..65535 (got {port!r})")
    coord = data.get("coordinator", {})
    if not isinstance(coord, dict):
        raise HaloError(f"{where}: [coordinator] must be a table")
    _unknown(set(coord), _COORD_KEYS, f"{where} [coordinator]")
    coord_cpu = None
    if "cpu" in coord:
        coord_cpu = _share(coord["cpu"], f"{where} [coordinator] cpu", 64.0, inclusive=True)
    raw = data.get("device", [])
    if not isinstance(raw, list) or not raw:
        raise HaloError(f"{where}: no [[device]] entries")
    if len(raw) > 200:
        raise HaloError(f"{where}: at most 200 devices")
    devices: list[Device] = []
    for i, d in enumerate(raw, start=1):
        devices.append(_parse_device(d, i, where, {x.name for x in devices}))
    return Spec(name=name, subnet=subnet, port=port, devices=tuple(devices),
                coordinator_cpu=coord_cpu, path=path)


def _parse_device(d: Any, i: int, where: str, seen: set[str]) -> Device:
    """Device `i` of the spec (`seen`: the names of the devices before it)."""
    if not isinstance(d, dict):
        raise HaloError(f"{where}: device {i} must be a table")
    dname = str(d.get("name", f"w{i}"))
    at = f"{where} device '{dname}'"
    _unknown(set(d), _DEVICE_KEYS, at)
    if not _NAME.match(dname):
        raise HaloError(f"{at}: name must be 1-8 lowercase letters/digits, starting with a "
                        "letter")
    if dname in seen:
        raise HaloError(f"{at}: duplicate device name")
    if "loss" in d and ("loss_in" in d or "loss_out" in d):
        raise HaloError(f"{at}: give either loss or loss_in/loss_out, not both")
    loss = d.get("loss", 0.0)
    loss_in = _share(d.get("loss_in", loss), f"{at}: loss_in")
    loss_out = _share(d.get("loss_out", loss), f"{at}: loss_out")
    delay = float(d.get("delay_ms", 0.0))
    jitter = float(d.get("jitter_ms", 0.0))
    if delay < 0 or jitter < 0:
        raise HaloError(f"{at}: delay_ms and jitter_ms must be >= 0")
    if jitter > 0 and delay == 0:
        raise HaloError(f"{at}: jitter_ms needs a delay_ms")
    cpu = None
    if "cpu" in d:
        cpu = _share(d["cpu"], f"{at}: cpu", 64.0, inclusive=True)
        if cpu < 0.01:
            raise HaloError(f"{at}: cpu must be at least 0.01 of a core")
    return Device(
        name=dname, index=i, loss_in=loss_in, loss_out=loss_out,
        bandwidth_bps=parse_rate(d["bandwidth"], at) if "bandwidth" in d else None,
        delay_ms=delay, jitter_ms=jitter, cpu=cpu,
        memory_bytes=parse_size(d["memory"], at) if "memory" in d else None)


def load_spec(path: str | Path) -> Spec:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise HaloError(f"spec file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HaloError(f"{p}: unreadable ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise HaloError(f"{p}: not valid TOML ({exc})") from None
    return parse_spec(data, p)
