"""The control plane's messages: typed records, one codec, authenticated ZeroMQ frames.

Control messages (join, plan, heartbeat, KV repair and replay, keep-alive, shutdown) travel
over ZeroMQ, which gives reliable, ordered delivery over TCP. Each is a frozen dataclass; on
the wire it is a JSON header (its kind and its non-bytes fields), one frame per bytes field,
and a keyed BLAKE2b MAC over all of them. ``decode`` returns the record or raises
ProtocolError for anything forged, unknown, truncated or of the wrong type; receivers
dispatch with ``match``. Nothing is unpickled; tensors travel as raw float32 bytes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import types
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import zmq

from halollm.runtime.protocol import MAC_SIZE, ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER = 1 << 20
# the largest frame a control socket accepts (ZMQ_MAXMSGSIZE), checked by ZeroMQ before any
# byte of it is kept: a strict-mode activation (protocol.MAX_BODY) plus its header and MAC;
# KV repair and replay travel in chunks of at most KV_CHUNK_BYTES
MAX_FRAME = (64 << 20) + (1 << 16)
KV_CHUNK_BYTES = 8 << 20


def harden(sock: Any) -> None:
    """Bounds on a control socket before any peer is authenticated: frame size, how long a
    ZMTP handshake may take, and ZMTP heartbeats that drop connections gone silent."""
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = ""


# -- coordinator -> worker ---------------------------------------------------------------
@dataclass(frozen=True)
class Hello(Message):
    kind: ClassVar[str] = "hello"
    version: int
    session: int
    nonce: str
    model_hash: str
    udp: list[Any]  # [host, port] where the coordinator receives datagrams
    proof: str


@dataclass(frozen=True)
class Plan(Message):
    kind: ClassVar[str] = "plan"
    session: int
    epoch: int
    device: int
    dtype: str
    wire: int
    request: int
    layers: str  # JSON: per layer, the attention and MLP groups and units of this device


@dataclass(frozen=True)
class Kv(Message):
    """Layer inputs [n, d] at positions start..start+n-1: a KV repair or a replay."""

    kind: ClassVar[str] = "kv"
    session: int
    request: int
    layer: int
    start: int
    n: int
    replay: bool
    x: bytes


@dataclass(frozen=True)
class Ping(Message):
    kind: ClassVar[str] = "ping"
    session: int
    t: float


@dataclass(frozen=True)
class Bye(Message):
    kind: ClassVar[str] = "bye"
    session: int


# -- worker -> coordinator ---------------------------------------------------------------
@dataclass(frozen=True)
class Welcome(Message):
    kind: ClassVar[str] = "welcome"
    session: int
    proof: str
    model_hash: str
    cores: int | None
    threads: int
    speed: float  # MLP neurons per ms (compute benchmark)
    memory: int  # bytes offered for weights
    load_speed: float  # neurons per ms read from the model file


@dataclass(frozen=True)
class Refused(Message):
    kind: ClassVar[str] = "refused"
    reason: str
    session: int | None = None


@dataclass(frozen=True)
class Ready(Message):
    kind: ClassVar[str] = "ready"
    session: int
    epoch: int
    error: str | None = None
    build_ms: float | None = None


@dataclass(frozen=True)
class Heartbeat(Message):
    kind: ClassVar[str] = "heartbeat"
    session: int
    stats: dict[str, Any]


@dataclass(frozen=True)
class Need(Message):
    """Positions of a layer whose keys and values the worker is missing."""

    kind: ClassVar[str] = "need"
    session: int
    request: int
    layer: int
    positions: list[int]


@dataclass(frozen=True)
class Pong(Message):
    kind: ClassVar[str] = "pong"
    session: int
    t: float


MESSAGES: dict[str, type[Message]] = {
    m.kind: m for m in (Hello, Plan, Kv, Ping, Bye, Welcome, Refused, Ready, Heartbeat, Need,
                        Pong)}
_HINTS = {kind: get_type_hints(cls) for kind, cls in MESSAGES.items()}


def _mac(key: bytes, frames: list[bytes]) -> bytes:
    h = hashlib.blake2b(key=key, digest_size=MAC_SIZE)
    for f in frames:
        h.update(struct.pack(">Q", len(f)))
        h.update(f)
    return h.digest()


def _blob_fields(cls: type[Message]) -> list[str]:
    return [f.name for f in fields(cls) if _HINTS[cls.kind][f.name] is bytes]


def encode(key: bytes, msg: Message) -> list[bytes]:
    """The message as ZeroMQ frames: JSON header, one frame per bytes field, MAC."""
    blobs = _blob_fields(type(msg))
    head = {"kind": msg.kind, **{f.name: getattr(msg, f.name) for f in fields(msg)
                                 if f.name not in blobs}}
    frames = [json.dumps(head, separators=(",", ":")).encode(),
              *(getattr(msg, name) for name in blobs)]
    return [*frames, _mac(key, frames)]


def keyless_refusal(reason: str) -> list[bytes]:
    """A refusal to a peer that does not hold our key (it cannot check a MAC anyway)."""
    return [json.dumps({"kind": "refused", "reason": reason}).encode(), b"\0" * MAC_SIZE]


def is_keyless_refusal(frames: list[bytes], reason: str) -> bool:
    return len(frames) == 2 and frames[1] == b"\0" * MAC_SIZE and reason.encode() in frames[0]


def _fits(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and (item is Any or all(_fits(v, item) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def decode(key: bytes, frames: list[bytes]) -> Message:
    """The typed message; ProtocolError for anything forged, unknown or malformed."""
    if len(frames) < 2:
        raise ProtocolError("malformed", "too few frames")
    *body, tag = frames
    if len(tag) != MAC_SIZE or not secrets.compare_digest(_mac(key, body), tag):
        raise ProtocolError("unauthenticated")
    if len(body[0]) > MAX_HEADER:
        raise ProtocolError("malformed", "header too large")
    try:
        head = json.loads(body[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed", f"header is not JSON ({exc})") from exc
    if not isinstance(head, dict):
        raise ProtocolError("malformed", "header is not an object")
    kind = head.pop("kind", None)
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("unknown_kind")
    blobs = _blob_fields(cls)
    if len(body) - 1 != len(blobs):
        raise ProtocolError("malformed", f"{cls.kind} carries {len(blobs)} blobs")
    head.update(zip(blobs, body[1:], strict=True))
    hints = _HINTS[cls.kind]
    known = {f.name for f in fields(cls)}
    if set(head) - known:
        raise ProtocolError("malformed", f"{cls.kind}: unknown fields {sorted(set(head) - known)}")
    for name, value in head.items():
        if not _fits(value, hints[name]):
            raise ProtocolError("malformed", f"{cls.kind}.{name} has the wrong type")
    try:
        return cls(**head)
    except TypeError as exc:  # a required field missing
        raise ProtocolError("malformed", f"{cls.kind}: {exc}") from exc


def tensor_blob(x: torch.Tensor) -> bytes:
    return x.float().contiguous().numpy().tobytes()


def blob_tensor(blob: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    if len(blob) != 4 * n:
        raise ProtocolError("malformed", f"blob of {len(blob)} bytes is not {shape} float32")
    return torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()).reshape(shape)


def join_proof(key: bytes, role: str, nonce: str, model_hash: str) -> str:
    """Proof that the sender holds the cluster key, bound to this join and this model."""
    return hashlib.blake2b(f"{role}|{nonce}|{model_hash}".encode(), key=key,
                           digest_size=16).hexdigest()
