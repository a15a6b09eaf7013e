"""Datagram endpoint of the data plane: send tagged messages, receive and reassemble them.

Everything that arrives is checked (format, then the link's AEAD and replay window) and
counted; nothing malformed, forged or replayed ever raises out of here.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import time
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from halollm.errors import HaloError
from halollm.runtime import protocol
from halollm.runtime.channel import Channel
from halollm.runtime.protocol import ChannelFor, ProtocolError, RoundTag

Address = tuple[str, int]
RECEIVE_BATCH = 256  # datagrams read per wake-up at most
IP_MTU = 14  # Linux <netinet/in.h>: the path MTU of a connected socket
MAX_DATAGRAM_MTU = 65535  # an IPv4 datagram's largest size
MIN_MTU = 576  # every IPv4 host must take datagrams this large


def native_wire() -> object | None:
    """The C data path (`_wire.c`, built at install where OpenSSL's headers are), unless
    HALO_PURE_PYTHON is set or it speaks another protocol version: then None and the
    Python path (protocol.py), which produces and accepts the same datagrams."""
    if os.environ.get("HALO_PURE_PYTHON"):
        return None
    try:
        from halollm.runtime import _wire  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _wire if getattr(_wire, "VERSION", None) == protocol.VERSION else None


NATIVE = native_wire()


class Message(NamedTuple):
    kind: int
    sender: int
    wire: int
    tag: RoundTag
    body: bytes
    addr: Address | None


def path_mtu(addr: Address) -> int:
    """The MTU of the route to addr as the kernel knows it (65536 on loopback, the
    interface's on a LAN; at most 65535; the protocol's default if unknown)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(addr)
        mtu = s.getsockopt(socket.IPPROTO_IP, IP_MTU)
    except OSError:
        return protocol.DEFAULT_MTU
    finally:
        s.close()
    return min(mtu, MAX_DATAGRAM_MTU) if mtu >= MIN_MTU else protocol.DEFAULT_MTU


class UdpEndpoint:
    """A UDP socket speaking the data-plane protocol."""

    def __init__(self, host: str, port: int, channel_for: ChannelFor,
                 mtu: int | None = None, drop_rate: float = 0.0,
                 seed: int | None = None, native: object | None = NATIVE) -> None:
        """`mtu`: the datagram size limit on the wire; None: each destination's path MTU
        (one datagram per message on loopback, 1500-byte datagrams on Ethernet/Wi-Fi)."""
        self.channel_for, self.mtu, self.native = channel_for, mtu, native
        self._mtu_of: dict[Address, int] = {}
        self._route_of: dict[Address, tuple[bytes | None, int]] = {}  # _route's answers
        self._buffer = bytearray(1 << 16)
        self._view = memoryview(self._buffer)
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
        self.slept_s = 0.0  # time receive() waited in C for a gather's datagrams
        self.wakeups = 0  # ... and how often datagrams woke it there
        self.coalesce_s = 0.0  # pause after such a wake-up while several are to come
        self._rng = random.Random(seed)

    def readable(self, timeout: float, spin: float = 0.0) -> bool:
        """Whether a datagram waits (within `timeout` seconds). `spin`: poll without
        sleeping for up to that long first -- a wake-up from sleep costs tens of
        microseconds, which a device with a core to itself can save; on shared cores the
        spinning takes the CPU its peers compute on."""
        if spin > 0.0:
            end = time.perf_counter() + min(spin, timeout)
            fds = [self.sock]
            while True:
                if select.select(fds, (), (), 0)[0]:
                    return True
                now = time.perf_counter()
                if now >= end:
                    break
            timeout -= min(spin, timeout)
        return bool(select.select([self.sock], (), (), max(0.0, timeout))[0])

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def send(self, kind: int, sender: int, wire: int, tag: RoundTag, body: bytes,
             targets: Sequence[tuple[Address, Channel]]) -> None:
        """Seal the message for each target's link and send its fragments. A full send
        buffer or an unreachable peer loses the datagram, like the network would."""
        sendto, sent, errors = self.sock.sendto, 0, 0
        if self.native is not None:
            sent, errors, targets = self._send_native(kind, sender, wire, tag, body, targets)
        for addr, channel in targets:
            for g in protocol.encode(kind, sender, wire, tag, body, channel, self.mtu_to(addr)):
                try:
                    sendto(g, addr)
                    sent += 1
                except OSError:
                    errors += 1
        self.counters["datagrams_sent"] += sent
        if errors:
            self.counters["send_errors"] += errors

    def _send_native(self, kind: int, sender: int, wire: int, tag: RoundTag, body: bytes,
                     targets: Sequence[tuple[Address, Channel]]
                     ) -> tuple[int, int, list[tuple[Address, Channel]]]:
        """Every fragment for every target with an IPv4 address, sealed and sent in C (one
        sendmmsg per MTU; the channels' counters advanced there); (sent, errors, the
        targets left to the Python path)."""
        by_mtu, rest = self._routes(targets)
        sent = errors = 0
        n = len(body)
        for mtu, group in by_mtu.items():
            prefix, size, _ = protocol.message_prefix(kind, sender, wire, tag, n, mtu)
            ok, bad = self.native.seal_send(  # type: ignore[attr-defined]
                self.sock.fileno(), prefix, body, size, group)
            sent, errors = sent + ok, errors + bad
        return sent, errors, rest

    def _routes(self, targets: Sequence[tuple[Address, Channel]]
               ) -> tuple[dict[int, list[tuple[bytes, Channel]]], list[tuple[Address, Channel]]]:
        """The native send's view of these targets: per MTU, (packed sockaddr, channel) for
        seal_send; and the targets left to the Python path."""
        by_mtu: dict[int, list[tuple[bytes, Channel]]] = {}
        rest = []
        for addr, channel in targets:
            sa, mtu = self._route(addr)
            if sa is None:
                rest.append((addr, channel))
            else:
                by_mtu.setdefault(mtu, []).append((sa, channel))
        return by_mtu, rest

    def _route(self, addr: Address) -> tuple[bytes | None, int]:
        """(packed IPv4 sockaddr for seal_send, or None for the Python path; the MTU)."""
        route = self._route_of.get(addr)
        if route is not None:
            return route
        try:
            sa = self.native.sockaddr(*addr)  # type: ignore[attr-defined]
        except (ValueError, TypeError):
            sa = None
        route = self._route_of[addr] = (sa, self.mtu_to(addr))
        return route

    def mtu_to(self, addr: Address) -> int:
        mtu = self.mtu or self._mtu_of.get(addr)
        if mtu is None:
            mtu = self._mtu_of[addr] = path_mtu(addr)
        return mtu

    def gather(self, tag: RoundTag, senders: list[int], channels: list[Channel], wire: int,
               dim: int, spans: list[tuple[int, int]] | None = None) -> object | None:
        """A decode round's partials taken in by the native path (`_wire.Gather`: replay
        windows, reassembly, checks and the float32 sum in C; hand it to `receive`), or None
        where the Python path takes them (no native module, user-space loss emulation,
        prompt rounds). `spans`: per sender, (offset, length) of its values in the output
        (the LM head's rows), instead of all `dim` of them."""
        if not self._native_receive or tag.ntok != 1:
            return None
        return self.native.Gather(tuple(tag), senders, channels, wire, dim, spans)  # type: ignore[attr-defined]

    @property
    def _native_receive(self) -> bool:
        """Whether datagrams are received in C: where it is built, unless loss is emulated
        here (the Python path drops them before anything else sees them)."""
        return self.native is not None and not (self.drop_rate or self.drop_from)

    def receive(self, limit: int = RECEIVE_BATCH, gather: object | None = None,
                timeout: float = 0.0) -> list[Message]:
        """The complete messages among at most `limit` datagrams waiting now (non-blocking).
        Bounded, so that a flood cannot keep a caller from its other duties (heartbeats,
        the control plane): the rest waits for the next call. With a `gather` (from
        `gather()`), its round's partials are taken in there and not returned, and
        `timeout` lets it wait (in C, counted in `slept_s`) until all of them are in or
        something else came."""
        if self._native_receive:
            return self._receive_native(limit, gather, timeout)
        emulated = self.drop_rate or self.drop_from
        out: list[Message] = []
        recv, view, counters = self.sock.recvfrom_into, self._view, self.counters
        received = 0
        for _ in range(limit):
            try:
                n, addr = recv(self._buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                counters["receive_errors"] += 1
                continue
            if emulated:
                rate = self.drop_from.get(addr, self.drop_rate)
                if rate and self._rng.random() < rate:
                    counters["dropped_emulated"] += 1
                    continue
            received += 1
            try:
                self._assemble(protocol.decode(view[:n], self.channel_for), addr, out)
            except ProtocolError as exc:
                counters[exc.reason] += 1
        counters["datagrams_received"] += received
        return out

    def _assemble(self, frag: protocol.Fragment, addr: Address, out: list[Message]) -> None:
        """An opened fragment into its message, the message into `out` once complete (a
        one-datagram message at once); ProtocolError as the reassembler raises it."""
        body = self.reassembler.add(frag)
        if body is not None:
            out.append(Message(frag.kind, frag.sender, frag.wire, frag.tag, body, addr))

    def _receive_native(self, limit: int, gather: object | None = None, timeout: float = 0.0
                        ) -> list[Message]:
        """`receive` with the datagrams read, parsed and opened in C (one recvmmsg per 64);
        the replay windows and reassembly of what a `gather` did not take in are here."""
        out: list[Message] = []
        counters, received = self.counters, 0
        raw_tag: tuple | None = None
        round_tag = None
        args = (self.sock.fileno(), limit, self.channel_for, protocol.KIND_MASK,
                protocol.PHASE_MASK)
        if gather is None:
            items = self.native.recv_open(*args)  # type: ignore[attr-defined]
        elif timeout > 0.0:
            items, received, slept, woken = gather.wait(  # type: ignore[attr-defined]
                *args, timeout, self.coalesce_s)
            self.slept_s += slept
            self.wakeups += woken
        else:
            items, received = gather.pump(*args)  # type: ignore[attr-defined]
        for item in items:
            if item.__class__ is str:
                if item == "receive_error":  # e.g. ICMP port unreachable
                    counters["receive_errors"] += 1
                else:
                    received += 1
                    counters[item] += 1
                continue
            received += 1
            channel, counter, kind, sender, wire, tag, index, count, body_len, payload, addr = item
            if tag is not raw_tag:  # a round's fragments share one tag object (_wire.c)
                raw_tag, round_tag = tag, RoundTag(*tag)
            try:
                channel.admit(counter)
                self._assemble(protocol.Fragment(kind, sender, wire, round_tag, index,
                                                 count, body_len, payload), addr, out)
            except ProtocolError as exc:
                counters[exc.reason] += 1
        counters["datagrams_received"] += received
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
