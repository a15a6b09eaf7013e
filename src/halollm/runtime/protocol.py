"""The data-plane wire format: tagged, fragmented, encrypted datagrams (pure functions).

One *message* carries one tensor for one synchronisation round: the coordinator's layer input
(an ``ACTIVATION``) or a worker's partial residual update (a ``PARTIAL``). A round is named by
(session, plan epoch, request, position, token count, layer, phase). A message body is split
into fragments that fit the path MTU; every fragment is a datagram of its own:

    header (HEADER.size bytes, big-endian, in clear) | sealed fragment of the body (+16 bytes)

The fragment is sealed with the link's data key (ChaCha20-Poly1305, channel.py); the header,
which ends with the sender's counter, is the authenticated data. A datagram from anyone
without the key, altered on the way, replayed, or from an earlier session is rejected before
anything else looks at it. Nothing is unpickled; the body is raw tensor bytes described by
the header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from halollm.errors import ProtocolError
from halollm.runtime.channel import TAG_SIZE, Channel

MAGIC = b"HL"
VERSION = 3  # 3: the int8 wire is Q8_0-style blocks (was: one scale per row)
MAC_SIZE = TAG_SIZE
ACTIVATION, PARTIAL = 1, 2
KINDS = (ACTIVATION, PARTIAL)
ATTN, MLP, PROBE, HEAD = 0, 1, 2, 3  # PROBE: answered at once with zeros (what a round
# costs); HEAD: the LM head's rows a worker holds (layer 0)
PHASE_NAMES = {ATTN: "attn", MLP: "mlp", PROBE: "probe", HEAD: "head"}

# magic, version, kind, sender, wire, session, epoch, request, pos, ntok, layer, phase, _,
# fragment index, fragment count, body length, the sender's counter (the AEAD nonce)
HEADER = struct.Struct(">2sBBBBIIIIHHBBHHIQ")
_PREFIX = struct.Struct(">2sBBBBIIIIHHBB")  # what every fragment of a message shares
_SUFFIX = struct.Struct(">HHIQ")  # fragment index, count, body length, counter
DEFAULT_MTU = 1500
IP_UDP_OVERHEAD = 28  # IPv4 (20) + UDP (8)
MAX_BODY = 64 << 20  # refuse to reassemble anything larger (a forged length cannot eat RAM)
MAX_FRAGMENTS = 65535
MAX_PENDING_BYTES = 256 << 20  # bodies being reassembled, all senders together
ChannelFor = Callable[[int, int], Channel | None]  # (sender, session) -> its link, if any


class RoundTag(NamedTuple):
    """What a message is about. Equal tags = the same synchronisation round. (A tuple:
    compared and hashed in C, on every datagram of the hot path.)"""

    session: int
    epoch: int
    request: int
    pos: int
    ntok: int
    layer: int
    phase: int


class Fragment(NamedTuple):
    kind: int
    sender: int
    wire: int
    tag: RoundTag
    index: int
    count: int
    body_len: int
    payload: bytes


def max_payload(mtu: int) -> int:
    return mtu - IP_UDP_OVERHEAD - HEADER.size - MAC_SIZE


def message_prefix(kind: int, sender: int, wire: int, tag: RoundTag, n: int, mtu: int
                   ) -> tuple[bytes, int, int]:
    """(the header bytes every fragment of a message of `n` bytes shares, the payload of a
    fragment, the fragment count) -- after checking what the sender asked for."""
    if kind not in KINDS:
        raise ValueError(f"bad message kind {kind}")
    size = max_payload(mtu)
    if size < 64:
        raise ValueError(f"MTU {mtu} is too small")
    if n > MAX_BODY:
        raise ValueError(f"message of {n} bytes exceeds {MAX_BODY}")
    return _PREFIX.pack(MAGIC, VERSION, kind, sender, wire, *tag, 0), size, max(1, -(-n // size))


def encode(kind: int, sender: int, wire: int, tag: RoundTag, body: bytes | memoryview,
           channel: Channel, mtu: int = DEFAULT_MTU) -> list[bytes]:
    """A message as a list of sealed datagrams, each at most `mtu` bytes on the wire (with
    IP/UDP); every datagram takes the next counter of `channel`."""
    n = len(body)
    prefix, size, count = message_prefix(kind, sender, wire, tag, n, mtu)
    view = memoryview(body)
    out = []
    for i in range(count):
        counter = channel.next_counter()
        head = prefix + _SUFFIX.pack(i, count, n, counter)
        out.append(head + channel.seal(counter, head, view[i * size:(i + 1) * size]))
    return out


def decode(datagram: bytes | memoryview, channel_for: ChannelFor) -> Fragment:
    """Check, open and parse one datagram (bytes, or a view of a receive buffer); raises
    ProtocolError (never anything else). `channel_for(sender, session)` is the link the
    datagram must come from (None: nobody we have a session with)."""
    if len(datagram) < HEADER.size + MAC_SIZE:
        raise ProtocolError("malformed", f"{len(datagram)} bytes is shorter than a header")
    (magic, version, kind, sender, wire, session, epoch, request, pos, ntok, layer, phase, _,
     index, count, body_len, counter) = HEADER.unpack_from(datagram)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError("malformed", "bad magic or version")
    if kind not in KINDS or phase not in PHASE_NAMES:
        raise ProtocolError("malformed", "bad kind or phase")
    if count == 0 or index >= count or body_len > MAX_BODY:
        raise ProtocolError("malformed", "bad fragment numbering or length")
    channel = channel_for(sender, session)
    if channel is None:
        raise ProtocolError("unknown_sender")
    view = memoryview(datagram)
    payload = channel.open(counter, view[:HEADER.size], view[HEADER.size:])
    if len(payload) > body_len:
        raise ProtocolError("malformed", "payload longer than the body")
    return Fragment(kind, sender, wire, RoundTag(session, epoch, request, pos, ntok, layer,
                                                 phase), index, count, body_len, payload)


KIND_MASK = sum(1 << k for k in KINDS)  # for the native receive (transport.py)
PHASE_MASK = sum(1 << p for p in PHASE_NAMES)


class Reassembler:
    """Collects fragments into message bodies. Bounded: at most `max_pending` messages are
    being assembled at once, at most `per_sender` of them from one sender, at most
    MAX_PENDING_BYTES held in all (the oldest is dropped first), and a message whose
    fragments exceed its declared length is dropped."""

    def __init__(self, max_pending: int = 64, per_sender: int = 32,
                 max_bytes: int = MAX_PENDING_BYTES) -> None:
        self.max_pending, self.per_sender, self.max_bytes = max_pending, per_sender, max_bytes
        self._pending: dict[tuple, tuple[Fragment, dict[int, bytes]]] = {}
        self._held: dict[tuple, int] = {}  # bytes held per message
        self.held_bytes = 0
        self.dropped_incomplete = 0

    def _drop(self, key: tuple) -> None:
        del self._pending[key]
        self.held_bytes -= self._held.pop(key)

    def _make_room(self, sender: int, size: int) -> None:
        """Drop the oldest messages until a new one from sender fits: the sender's own
        oldest when it is at its share, else the oldest of all."""
        while self._pending:
            mine = [k for k in self._pending if k[1] == sender]
            if len(mine) >= self.per_sender:
                victim = mine[0]
            elif len(self._pending) >= self.max_pending or \
                    self.held_bytes + size > self.max_bytes:
                victim = next(iter(self._pending))
            else:
                return
            self._drop(victim)
            self.dropped_incomplete += 1

    def add(self, frag: Fragment) -> bytes | None:
        """The whole body once its last fragment arrives; None while incomplete. Raises
        ProtocolError('duplicate') for a fragment seen before, ('malformed') for a fragment
        inconsistent with its siblings."""
        if frag.count == 1:
            if len(frag.payload) != frag.body_len:
                raise ProtocolError("malformed", "single fragment shorter than its body")
            return frag.payload
        key = (frag.kind, frag.sender, frag.tag)
        entry = self._pending.get(key)
        if entry is None:
            self._make_room(frag.sender, len(frag.payload))
            entry = (frag, {})
            self._pending[key], self._held[key] = entry, 0
        first, parts = entry
        if frag.count != first.count or frag.body_len != first.body_len:
            raise ProtocolError("malformed", "fragment disagrees with its message")
        if frag.index in parts:
            raise ProtocolError("duplicate")
        if self._held[key] + len(frag.payload) > frag.body_len:
            self._drop(key)
            raise ProtocolError("malformed", "fragments exceed the declared length")
        parts[frag.index] = frag.payload
        self._held[key] += len(frag.payload)
        self.held_bytes += len(frag.payload)
        if len(parts) < frag.count:
            return None
        self._drop(key)
        body = b"".join(parts[i] for i in range(frag.count))
        if len(body) != frag.body_len:
            raise ProtocolError("malformed", "reassembled length differs from the header")
        return body
