"""The data-plane wire format: tagged, fragmented, authenticated datagrams (pure functions).

One *message* carries one tensor for one synchronisation round: the coordinator's layer input
(an ``ACTIVATION``) or a worker's partial residual update (a ``PARTIAL``). A round is named by
(session, plan epoch, request, position, token count, layer, phase). A message body is split
into fragments that fit the path MTU; every fragment is a datagram of its own:

    header (HEADER.size bytes, big-endian) | fragment of the body | MAC (16 bytes)

The MAC is keyed BLAKE2b over header and payload with the cluster key, so a datagram from
anyone without the key, or altered on the way, is rejected before anything else looks at it.
Nothing is unpickled; the body is raw tensor bytes described by the header.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

MAGIC = b"HL"
VERSION = 1
MAC_SIZE = 16
ACTIVATION, PARTIAL = 1, 2
KINDS = (ACTIVATION, PARTIAL)
ATTN, MLP = 0, 1
PHASE_NAMES = {ATTN: "attn", MLP: "mlp"}

# magic, version, kind, sender, wire, session, epoch, request, pos, ntok, layer, phase, _,
# fragment index, fragment count, body length
HEADER = struct.Struct(">2sBBBBIIIIHHBBHHI")
DEFAULT_MTU = 1500
IP_UDP_OVERHEAD = 28  # IPv4 (20) + UDP (8)
MAX_BODY = 64 << 20  # refuse to reassemble anything larger (a forged length cannot eat RAM)
MAX_FRAGMENTS = 65535


class ProtocolError(ValueError):
    """A datagram that must be discarded; `reason` names the counter it is charged to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class RoundTag:
    """What a message is about. Equal tags = the same synchronisation round."""

    session: int
    epoch: int
    request: int
    pos: int
    ntok: int
    layer: int
    phase: int


@dataclass(frozen=True)
class Fragment:
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


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


def encode(kind: int, sender: int, wire: int, tag: RoundTag, body: bytes, key: bytes,
           mtu: int = DEFAULT_MTU) -> list[bytes]:
    """A message as a list of datagrams, each at most `mtu` bytes on the wire (with IP/UDP)."""
    if kind not in KINDS:
        raise ValueError(f"bad message kind {kind}")
    size = max_payload(mtu)
    if size < 64:
        raise ValueError(f"MTU {mtu} is too small")
    if len(body) > MAX_BODY:
        raise ValueError(f"message of {len(body)} bytes exceeds {MAX_BODY}")
    count = max(1, -(-len(body) // size))
    out = []
    for i in range(count):
        head = HEADER.pack(MAGIC, VERSION, kind, sender, wire, tag.session, tag.epoch,
                           tag.request, tag.pos, tag.ntok, tag.layer, tag.phase, 0, i, count,
                           len(body))
        data = head + body[i * size:(i + 1) * size]
        out.append(data + mac(key, data))
    return out


def decode(datagram: bytes, key: bytes) -> Fragment:
    """Check and parse one datagram; raises ProtocolError (never anything else)."""
    if len(datagram) < HEADER.size + MAC_SIZE:
        raise ProtocolError("malformed", f"{len(datagram)} bytes is shorter than a header")
    data, tail = datagram[:-MAC_SIZE], datagram[-MAC_SIZE:]
    if not hmac.compare_digest(mac(key, data), tail):
        raise ProtocolError("unauthenticated")
    (magic, version, kind, sender, wire, session, epoch, request, pos, ntok, layer, phase, _,
     index, count, body_len) = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError("malformed", "bad magic or version")
    if kind not in KINDS or phase not in PHASE_NAMES:
        raise ProtocolError("malformed", "bad kind or phase")
    if count == 0 or index >= count or body_len > MAX_BODY:
        raise ProtocolError("malformed", "bad fragment numbering or length")
    payload = data[HEADER.size:]
    if len(payload) > body_len:
        raise ProtocolError("malformed", "payload longer than the body")
    return Fragment(kind, sender, wire, RoundTag(session, epoch, request, pos, ntok, layer,
                                                 phase), index, count, body_len, payload)


class Reassembler:
    """Collects fragments into message bodies. Bounded: at most `max_pending` messages are
    being assembled at once (the oldest is dropped first) and a body never exceeds MAX_BODY."""

    def __init__(self, max_pending: int = 64) -> None:
        self.max_pending = max_pending
        self._pending: dict[tuple, tuple[Fragment, dict[int, bytes]]] = {}
        self.dropped_incomplete = 0

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
            if len(self._pending) >= self.max_pending:
                self._pending.pop(next(iter(self._pending)))
                self.dropped_incomplete += 1
            entry = (frag, {})
            self._pending[key] = entry
        first, parts = entry
        if frag.count != first.count or frag.body_len != first.body_len:
            raise ProtocolError("malformed", "fragment disagrees with its message")
        if frag.index in parts:
            raise ProtocolError("duplicate")
        parts[frag.index] = frag.payload
        if len(parts) < frag.count:
            return None
        del self._pending[key]
        body = b"".join(parts[i] for i in range(frag.count))
        if len(body) != frag.body_len:
            raise ProtocolError("malformed", "reassembled length differs from the header")
        return body
