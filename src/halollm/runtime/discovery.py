"""Workers found without typing addresses: mDNS/DNS-SD over zeroconf.

* A worker announces itself (`Announcer`): service type `_halo._tcp`, its address and port,
  and a TXT record with its model and memory budget (discovery_records.py: no key material).
* A coordinator browses for a few seconds (`browse`), drops announcements of another model,
  and then tries the keyed join with each one (`admit`): a worker that refuses it (another
  cluster's key) or does not answer is skipped with its reason instead of failing the whole
  run. The trial join is the runtime's own (links.py), so discovery never weakens it; the
  worker simply starts a new session when the coordinator joins for real.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from halollm.errors import HaloError
from halollm.runtime.discovery_records import (
    SERVICE_TYPE,
    Announced,
    instance_name,
    parse_service,
    txt_record,
)
from halollm.runtime.links import Links
from halollm.runtime.messages import Bye
from halollm.runtime.options import LinkOptions
from halollm.runtime.stats import SyncStats

DEFAULT_WAIT_S = 3.0
PROBE_TIMEOUT_S = 10.0  # a first join benchmarks the worker (about a second here)
Log = Callable[[str], None]


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (what a worker listening on
    0.0.0.0 announces)."""
    import ifaddr  # zeroconf's own dependency

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and not str(ip.ip).startswith("127."):
                out.append(str(ip.ip))
    return list(dict.fromkeys(out))


class Announcer:
    """Publishes one worker on the local network until close() (which says goodbye, so
    browsers drop it at once). Registration (name probing, ~1 s) runs in the background."""

    def __init__(self, host: str, port: int, model: str, model_hash: str,
                 memory_bytes: int | None, log: Log) -> None:
        from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

        anywhere = host in ("", "0.0.0.0")
        addresses = local_ipv4_addresses() if anywhere else [host]
        if not addresses:
            raise HaloError("no network address to announce this worker on")
        self.log = log
        name = instance_name(socket.gethostname(), host or "any", port)
        self.info = ServiceInfo(SERVICE_TYPE, name, port=port,
                                properties=txt_record(model, model_hash, memory_bytes),
                                server=name[:-len(SERVICE_TYPE) - 1] + ".local.",
                                parsed_addresses=addresses)
        self.zc = Zeroconf(interfaces=InterfaceChoice.All if anywhere else [host],
                           ip_version=IPVersion.V4Only)
        self.registered = threading.Event()
        self._thread = threading.Thread(target=self._register, name="halo-announce",
                                        daemon=True)
        self._thread.start()

    def _register(self) -> None:
        try:
            self.zc.register_service(self.info, allow_name_change=True)
        except Exception as exc:  # noqa: BLE001 -- announcing is a convenience, not a duty
            self.log(f"could not announce this worker on the network: {exc}")
            return
        self.registered.set()
        self.log(f"announced as {self.info.name} ({SERVICE_TYPE[:-7]})")

    def close(self) -> None:
        self._thread.join(timeout=5)
        try:
            if self.registered.is_set():
                self.zc.unregister_service(self.info)
        finally:
            self.zc.close()


def browse(wait_s: float = DEFAULT_WAIT_S, interfaces: Sequence[str] | None = None
           ) -> list[Announced]:
    """The HALO workers that answer on the local network within wait_s seconds (IPv4, on
    every interface or on those with the given local addresses); an announcement
    withdrawn meanwhile is dropped."""
    from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    names: dict[str, None] = {}
    lock = threading.Lock()

    def changed(zeroconf: Any, service_type: str, name: str,
                state_change: ServiceStateChange) -> None:
        with lock:
            if state_change is ServiceStateChange.Removed:
                names.pop(name, None)
            else:
                names[name] = None

    zc = Zeroconf(interfaces=list(interfaces) if interfaces else InterfaceChoice.All,
                  ip_version=IPVersion.V4Only)
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[changed])
        time.sleep(wait_s)
        browser.cancel()
        with lock:
            pending = list(names)
        found = []
        for name in pending:
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=1500)
            if info is None:
                continue
            a = parse_service(name, info.parsed_addresses(IPVersion.V4Only), info.port,
                              info.properties)
            if a is not None:
                found.append(a)
        return sorted(found, key=lambda a: (a.host, a.port))
    finally:
        zc.close()


def probe(address: tuple[str, int], key: Any, model_hash: str,
          timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Try the keyed join with one worker and leave again: None if it accepted, else why
    not (the join's own message: wrong key, different model, no answer)."""
    stats = SyncStats(mode="probe")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("0.0.0.0", 0))
        session = secrets.randbits(32)
        links = Links([address], key, session, model_hash, udp.getsockname()[1],
                      LinkOptions(join_timeout_s=timeout_s), stats, lambda _msg: None)
        try:
            links.join_all()
        except HaloError as exc:
            return str(exc)
        finally:
            links.close(Bye(session))
    return None


@dataclass
class Discovery:
    """What a discovery found: the workers to use, and those skipped with the reason."""

    used: list[Announced] = field(default_factory=list)
    skipped: list[tuple[Announced, str]] = field(default_factory=list)

    def report(self) -> list[str]:
        lines = [f"discovery: {len(self.used)} worker(s) of this cluster: "
                 + (", ".join(a.describe() for a in self.used) or "none")]
        lines += [f"discovery: skipped {a.host}:{a.port}: {why}" for a, why in self.skipped]
        return lines


def admit(found: list[Announced], key: Any, model_hash: str,
          timeout_s: float = PROBE_TIMEOUT_S) -> Discovery:
    """Sort the announced workers into those of this cluster (same model, the key's join
    accepted) and the skipped ones."""
    out = Discovery()
    for a in found:
        if not a.same_model(model_hash):
            out.skipped.append((a, f"another model ({a.model}, {a.model_hash[:12]}…)"))
            continue
        why = probe(a.address, key, model_hash, timeout_s)
        if why is None:
            out.used.append(a)
        else:
            out.skipped.append((a, why))
    return out


def discover(key: Any, model_hash: str, wait_s: float = DEFAULT_WAIT_S,
             interfaces: Sequence[str] | None = None,
             timeout_s: float = PROBE_TIMEOUT_S) -> Discovery:
    """Browse, then admit: the workers of this cluster that answer on the network."""
    return admit(browse(wait_s, interfaces), key, model_hash, timeout_s)
