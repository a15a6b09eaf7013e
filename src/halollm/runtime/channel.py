"""One direction pair of an encrypted link: ChaCha20-Poly1305 with counters and a replay
window, as DTLS and WireGuard do it.

Every sealed unit (a datagram, a control message) carries the sender's counter in clear; the
counter is the AEAD nonce (with the sender's direction, so the two ends of a link never
reuse one) and part of the authenticated data. A receiver accepts a counter once, and only
within a sliding window behind the highest it has authenticated: replays and very old
traffic are rejected before anything else looks at them, reordering within the window is
fine (datagrams).
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from halollm.errors import ProtocolError

TAG_SIZE = 16
WINDOW = 1024
COORDINATOR, WORKER = 0, 1  # directions: who sends
_NONCE = struct.Struct(">IQ")


class ReplayWindow:
    """Which counters have been accepted: the highest, and a bitmap of the `size` below it.
    Counters start at 1. `fresh` asks; `accept` records (only after authentication)."""

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self.highest = 0
        self.bits = 0  # bit i: counter highest - i was accepted

    def fresh(self, counter: int) -> str | None:
        """None if counter may be accepted; else why not ('replayed' or 'too_old')."""
        if counter <= 0:
            return "too_old"
        if counter > self.highest:
            return None
        behind = self.highest - counter
        if behind >= self.size:
            return "too_old"
        return "replayed" if self.bits >> behind & 1 else None

    def accept(self, counter: int) -> None:
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1) \
                if shift < self.size else 1
            self.highest = counter
        else:
            self.bits |= 1 << (self.highest - counter)


def _window(size: int) -> ReplayWindow:
    """A replay window: the native data path's (_wire.Window, the same rules, which it checks
    without calling Python) where it is built, else ReplayWindow."""
    from halollm.runtime.transport import NATIVE  # (transport imports this module)

    return ReplayWindow(size) if NATIVE is None else NATIVE.Window(size)  # type: ignore[attr-defined]


class Channel:
    """Seals what this end sends (its own counter) and opens what the peer sent."""

    def __init__(self, key: bytes, direction: int, window: int = WINDOW) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.key = key  # the native data path (_wire.c) seals and opens with it too
        self.direction = direction
        self.sent = 0
        self.window = _window(window)

    def next_counter(self) -> int:
        self.sent += 1
        return self.sent

    def seal(self, counter: int, aad: bytes, plaintext: bytes | memoryview) -> bytes:
        """Ciphertext and tag of plaintext, authenticating aad (which holds the counter)."""
        return self._aead.encrypt(_NONCE.pack(self.direction, counter), plaintext, aad)

    def _check_fresh(self, counter: int) -> None:
        why = self.window.fresh(counter)
        if why is not None:
            raise ProtocolError(why)

    def admit(self, counter: int) -> None:
        """A counter of a datagram opened elsewhere (the native path, transport.py) into the
        window; ProtocolError if replayed or old."""
        self._check_fresh(counter)
        self.window.accept(counter)

    def open(self, counter: int, aad: bytes | memoryview, sealed: bytes | memoryview) -> bytes:
        """The plaintext of what the peer sealed; ProtocolError if forged, replayed or old."""
        self._check_fresh(counter)
        try:
            plain = self._aead.decrypt(_NONCE.pack(1 - self.direction, counter), sealed, aad)
        except InvalidTag:
            raise ProtocolError("unauthenticated") from None
        self.window.accept(counter)
        return plain


def channel_pair(key: bytes) -> tuple[Channel, Channel]:
    """(coordinator end, worker end) of a link keyed with key (tests, benchmarks)."""
    return Channel(key, COORDINATOR), Channel(key, WORKER)
