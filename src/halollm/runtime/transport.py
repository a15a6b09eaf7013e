"""Datagram endpoint of the data plane: send tagged messages, receive and reassemble them.

Everything that arrives is checked (format, then the link's AEAD and replay window) and
counted; nothing malformed, forged or replayed ever raises out of here.
"""

from __future__ import annotations

import errno
import random
import socket
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from halollm.errors import HaloError
from halollm.runtime import protocol
from halollm.runtime.channel import Channel
from halollm.runtime.protocol import ChannelFor, ProtocolError, RoundTag

Address = tuple[str, int]
RECEIVE_BATCH = 256  # datagrams read per wake-up at most


@dataclass(frozen=True)
class Message:
    kind: int
    sender: int
    wire: int
    tag: RoundTag
    body: bytes
    addr: Address


class UdpEndpoint:
    """A UDP socket speaking the data-plane protocol."""

    def __init__(self, host: str, port: int, channel_for: ChannelFor,
                 mtu: int = protocol.DEFAULT_MTU, drop_rate: float = 0.0,
                 seed: int | None = None) -> None:
        self.channel_for, self.mtu = channel_for, mtu
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        except OSError:
            pass
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise HaloError(f"UDP port {port} on {host} is in use; choose another port"
                                ) from exc
            raise HaloError(f"cannot listen on UDP {host}:{port}: {exc.strerror}") from exc
        self.sock.setblocking(False)
        self.reassembler = protocol.Reassembler()
        self.counters: Counter[str] = Counter()
        # user-space loss emulation (when no kernel testbed is available): drop arriving
        # datagrams at this rate (or per sender address), before anything else sees them
        self.drop_rate = drop_rate
        self.drop_from: dict[Address, float] = {}
        self._rng = random.Random(seed)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def send(self, kind: int, sender: int, wire: int, tag: RoundTag, body: bytes,
             targets: Sequence[tuple[Address, Channel]]) -> None:
        """Seal the message for each target's link and send its fragments. A full send
        buffer or an unreachable peer loses the datagram, like the network would."""
        for addr, channel in targets:
            for g in protocol.encode(kind, sender, wire, tag, body, channel, self.mtu):
                try:
                    self.sock.sendto(g, addr)
                    self.counters["datagrams_sent"] += 1
                except OSError:
                    self.counters["send_errors"] += 1

    def receive(self, limit: int = RECEIVE_BATCH) -> list[Message]:
        """The complete messages among at most `limit` datagrams waiting now (non-blocking).
        Bounded, so that a flood cannot keep a caller from its other duties (heartbeats,
        the control plane): the rest waits for the next call."""
        out = []
        for _ in range(limit):
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                self.counters["receive_errors"] += 1
                continue
            rate = self.drop_from.get(addr, self.drop_rate)
            if rate and self._rng.random() < rate:
                self.counters["dropped_emulated"] += 1
                continue
            self.counters["datagrams_received"] += 1
            try:
                frag = protocol.decode(data, self.channel_for)
                body = self.reassembler.add(frag)
            except ProtocolError as exc:
                self.counters[exc.reason] += 1
                continue
            if body is not None:
                out.append(Message(frag.kind, frag.sender, frag.wire, frag.tag, body, addr))
        return out

    def close(self) -> None:
        self.sock.close()


def local_address_towards(host: str, port: int) -> str:
    """The local IP address this machine uses to reach host (for telling peers where to
    send datagrams)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((host, port))
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def parse_address(text: str, default_host: str = "127.0.0.1") -> Address:
    """'host:port' or ':port' or 'port' -> (host, port), with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    try:
        number = int(port)
    except ValueError:
        raise HaloError(f"bad address '{text}': expected HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise HaloError(f"bad address '{text}': port must be 0..65535")
    try:
        resolved = socket.gethostbyname(host or default_host)
    except OSError:
        raise HaloError(f"bad address '{text}': cannot resolve host '{host}'") from None
    return resolved, number
