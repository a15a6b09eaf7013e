"""What a worker says about itself on the local network (DNS-SD), as pure data: the service
type, the TXT record it publishes and the parsing of what a browser receives. No sockets here
(the zeroconf I/O is discovery.py).

The announcement is public: anyone on the network can read it. It carries the worker's
address, its model (file name and content hash, to skip workers with another model before
joining) and its memory budget -- never the cluster key or anything derived from it. Whether a
worker belongs to *this* cluster is settled by the keyed join alone.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SERVICE_TYPE = "_halo._tcp.local."
RECORD_VERSION = "1"  # of the TXT record's layout below
HASH_CHARS = 16  # of the model's sha256, enough to tell models apart
_MAX_LABEL = 63  # bytes in one DNS label (an instance name is one label)


@dataclass(frozen=True)
class Announced:
    """A worker as its announcement describes it."""

    name: str  # the DNS-SD instance name
    host: str
    port: int
    model: str  # the model file's name (display only)
    model_hash: str  # the first HASH_CHARS hex digits of its content hash
    memory_bytes: int | None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def describe(self) -> str:
        mem = f", {self.memory_bytes / 2**20:.0f} MiB" if self.memory_bytes else ""
        return f"{self.host}:{self.port} ({self.model}{mem})"

    def same_model(self, model_hash: str) -> bool:
        return model_hash[:HASH_CHARS] == self.model_hash


def txt_record(model: str, model_hash: str, memory_bytes: int | None) -> dict[str, str]:
    """The TXT record a worker publishes (strings; zeroconf encodes them as UTF-8)."""
    out = {"v": RECORD_VERSION, "model": model[:200], "hash": model_hash[:HASH_CHARS]}
    if memory_bytes:
        out["mem"] = str(int(memory_bytes))
    return out


def instance_name(hostname: str, host: str, port: int) -> str:
    """A DNS-SD instance name, unique per worker address: `halo-<host name>-<ip>-<port>`
    (several workers share a host name in network namespaces, or on one machine)."""
    base = re.sub(r"[^A-Za-z0-9-]+", "-", hostname).strip("-")[:24] or "device"
    where = re.sub(r"[^0-9A-Za-z]+", "-", host).strip("-") or "any"
    return f"halo-{base}-{where}-{port}"[:_MAX_LABEL] + "." + SERVICE_TYPE


def pick_host(addresses: Sequence[str]) -> str | None:
    """The address to reach a worker by: its first IPv4 address that is not loopback (a
    worker announced from another machine is never reachable at 127.0.0.1), else its first
    loopback one, else None. IPv6 addresses are left aside (the runtime speaks IPv4)."""
    v4 = []
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip.version == 4:
            v4.append(ip)
    for ip in v4:
        if not ip.is_loopback and not ip.is_unspecified:
            return str(ip)
    return str(v4[0]) if v4 and v4[0].is_loopback else None


def _text(props: Mapping[bytes | str, bytes | str | None], key: str) -> str | None:
    for k in (key, key.encode()):
        v = props.get(k)
        if v is None:
            continue
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None


def parse_service(name: str, addresses: Sequence[str], port: int | None,
                  properties: Mapping[bytes | str, bytes | str | None]) -> Announced | None:
    """A received service record as an Announced worker; None when it is not a HALO worker
    record this version understands (another layout, no usable address, a bad port or
    hash), so a stray or hostile announcement is skipped, never trusted."""
    if not name.endswith("." + SERVICE_TYPE) or _text(properties, "v") != RECORD_VERSION:
        return None
    host = pick_host(addresses)
    if host is None or port is None or not 0 < port < 65536:
        return None
    model_hash = (_text(properties, "hash") or "").lower()
    if len(model_hash) != HASH_CHARS or not re.fullmatch(r"[0-9a-f]+", model_hash):
        return None
    mem_text = _text(properties, "mem")
    memory = int(mem_text) if mem_text and mem_text.isdigit() else None
    model = _text(properties, "model") or "?"
    return Announced(name[:-len(SERVICE_TYPE) - 1], host, int(port), model[:200], model_hash,
                     memory)


def merge(given: Sequence[tuple[str, int]], found: Sequence[Announced]
          ) -> list[tuple[str, int]]:
    """The addresses to use: those given on the command line, then the discovered ones not
    among them, each once, in a stable order (by address)."""
    out = list(dict.fromkeys(given))
    for a in sorted(found, key=lambda a: (a.host, a.port)):
        if a.address not in out:
            out.append(a.address)
    return out
