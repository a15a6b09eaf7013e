"""The join's challenge-response, both sides (pure apart from the key derivation).

    coordinator -> worker   Hello(nonce_c)                      in clear
    worker -> coordinator   Challenge(nonce_w, salt)            in clear
    coordinator -> worker   Join(model, udp address)            sealed with the link keys
    worker -> coordinator   Welcome(profile) or Refused(reason) sealed

The link keys come from the cluster key stretched under the worker's salt and both nonces
(keys.py). A replayed Hello only earns a new challenge; a replayed Join or anything of an
earlier session fails to open, because the worker's nonce is new.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from halollm.errors import ProtocolError
from halollm.runtime.channel import COORDINATOR, WORKER, Channel
from halollm.runtime.keys import NONCE_BYTES, SALT_BYTES, ClusterKey, link_keys
from halollm.runtime.messages import PROTOCOL_VERSION, Challenge, Hello

PENDING_LIMIT = 64  # open challenges a worker keeps (the oldest is forgotten first)
PENDING_TTL_S = 30.0


@dataclass
class LinkChannels:
    """One end of a session: its control channel and its data channel."""

    control: Channel
    data: Channel


def channels(stretched: bytes, nonce_c: bytes, nonce_w: bytes, end: int) -> LinkChannels:
    keys = link_keys(stretched, nonce_c, nonce_w)
    return LinkChannels(Channel(keys.control, end), Channel(keys.data, end))


def _hex(text: str, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ProtocolError("malformed", f"bad {what}")
    return raw


def hello(session: int) -> tuple[Hello, bytes]:
    """The coordinator's opening: the message and its nonce."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return Hello(PROTOCOL_VERSION, session, nonce.hex()), nonce


def coordinator_channels(key: ClusterKey, nonce_c: bytes, ch: Challenge) -> LinkChannels:
    """The coordinator's end of the session a worker's challenge opens."""
    salt = _hex(ch.salt, SALT_BYTES, "salt")
    return channels(key.stretched(salt), nonce_c, _hex(ch.nonce, NONCE_BYTES, "nonce"),
                    COORDINATOR)


@dataclass
class _Open:
    session: int
    link: LinkChannels
    at: float


class Challenges:
    """A worker's open challenges, one per coordinator connection (ZeroMQ identity)."""

    def __init__(self, key: ClusterKey) -> None:
        self.salt = secrets.token_bytes(SALT_BYTES)
        self._stretched = key.stretched(self.salt)
        self._open: OrderedDict[bytes, _Open] = OrderedDict()

    def issue(self, identity: bytes, h: Hello) -> Challenge:
        """The answer to a Hello; remembered until the Join comes (or is forgotten)."""
        nonce_w = secrets.token_bytes(NONCE_BYTES)
        link = channels(self._stretched, _hex(h.nonce, NONCE_BYTES, "nonce"), nonce_w, WORKER)
        self._open.pop(identity, None)
        self._open[identity] = _Open(h.session, link, time.monotonic())
        while len(self._open) > PENDING_LIMIT:
            self._open.popitem(last=False)
        return Challenge(PROTOCOL_VERSION, h.session, nonce_w.hex(), self.salt.hex())

    def channel(self, identity: bytes) -> Channel | None:
        """The control channel a sealed Join from identity must open with, if any."""
        entry = self._open.get(identity)
        if entry is None or time.monotonic() - entry.at > PENDING_TTL_S:
            return None
        return entry.link.control

    def take(self, identity: bytes) -> tuple[int, LinkChannels] | None:
        """Close identity's challenge: (session, its channels) once its Join opened."""
        entry = self._open.pop(identity, None)
        return None if entry is None else (entry.session, entry.link)
