"""The control plane's messages: typed records, one codec, encrypted ZeroMQ frames.

Control messages (join, plan, heartbeat, KV repair and replay, keep-alive, shutdown) travel
over ZeroMQ, which gives reliable, ordered delivery over TCP. Each is a frozen dataclass,
written as a JSON header (its kind and its non-bytes fields) and one part per bytes field.

The join is a challenge-response: the coordinator's ``Hello`` and the worker's ``Challenge``
(two fresh nonces and the worker's salt) travel in clear, as one ``HJ`` frame; both sides
then derive the session's link keys (keys.py) and everything after -- from the coordinator's
``Join`` on -- is *sealed*: one ``HS`` frame of its counter, one of the message's parts
encrypted with the link's control channel (ChaCha20-Poly1305, channel.py; a counter is
accepted once). Opening a sealed ``Join`` is the worker's proof that the coordinator holds
the cluster key, and opening the sealed ``Welcome`` the coordinator's proof of the worker.
``decode`` returns the record or raises ProtocolError for anything forged, replayed,
unknown, truncated or of the wrong type; receivers dispatch with ``match``. Nothing is
unpickled; tensors travel as raw float32 bytes.
"""

from __future__ import annotations

import errno
import json
import struct
import types
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import zmq

from halollm.errors import HaloError, ProtocolError
from halollm.runtime.channel import Channel

PROTOCOL_VERSION = 3
CLEAR, SEALED = b"HJ", b"HS"
_COUNTER = struct.Struct(">Q")
_LENGTH = struct.Struct(">Q")
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


def bound_router(ctx: Any, host: str, port: int) -> Any:
    """A worker's hardened ROUTER socket listening on TCP host:port (a new coordinator's
    connection takes over its identity); a HaloError naming the cause if it cannot."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)
    harden(router)
    try:
        router.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError as exc:
        router.close(0)
        if exc.errno == errno.EADDRINUSE:
            raise HaloError(f"TCP port {port} on {host} is in use; choose another port") \
                from exc
        raise HaloError(f"cannot listen on TCP {host}:{port}: {exc}") from exc
    return router


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = ""


# -- coordinator -> worker ---------------------------------------------------------------
@dataclass(frozen=True)
class Hello(Message):
    """In clear: the coordinator's fresh nonce for this join."""

    kind: ClassVar[str] = "hello"
    version: int
    session: int
    nonce: str  # hex


@dataclass(frozen=True)
class Join(Message):
    """Sealed with the link keys of (Hello, Challenge): the coordinator holds the key."""

    kind: ClassVar[str] = "join"
    session: int
    model_hash: str
    udp: list[Any]  # [host, port] where the coordinator receives datagrams
    weight_format: str = ""  # the session's (the worker benchmarks itself in it); "": default
    device: int = -1  # the worker's number in the session (its plans say it again)


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
    head_start: int = 0  # the LM head's rows this device computes: first, and how many
    head_rows: int = 0


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
class Challenge(Message):
    """In clear: the worker's fresh nonce, and the salt its cluster key is stretched with."""

    kind: ClassVar[str] = "challenge"
    version: int
    session: int
    nonce: str  # hex
    salt: str  # hex


@dataclass(frozen=True)
class Welcome(Message):
    """Sealed: the worker holds the key and has joined."""

    kind: ClassVar[str] = "welcome"
    session: int
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
    m.kind: m for m in (Hello, Join, Plan, Kv, Ping, Bye, Challenge, Welcome, Refused, Ready,
                        Heartbeat, Need, Pong)}
IN_CLEAR = frozenset({"hello", "challenge", "refused"})  # what may travel unsealed
WRONG_KEY = "wrong cluster key"  # the reason a worker refuses a Join it cannot open
_HINTS = {kind: get_type_hints(cls) for kind, cls in MESSAGES.items()}


def _blob_fields(cls: type[Message]) -> list[str]:
    return [f.name for f in fields(cls) if _HINTS[cls.kind][f.name] is bytes]


def _parts(msg: Message) -> list[bytes]:
    """The message as parts: JSON header, then one part per bytes field."""
    blobs = _blob_fields(type(msg))
    head = {"kind": msg.kind, **{f.name: getattr(msg, f.name) for f in fields(msg)
                                 if f.name not in blobs}}
    return [json.dumps(head, separators=(",", ":")).encode(),
            *(getattr(msg, name) for name in blobs)]


def encode_clear(msg: Message) -> list[bytes]:
    """A join-phase message (hello, challenge, refused) as one unsealed frame."""
    if msg.kind not in IN_CLEAR:
        raise ValueError(f"a {msg.kind!r} message is never sent in clear")
    return [CLEAR + _parts(msg)[0]]


def encode(channel: Channel, msg: Message) -> list[bytes]:
    """The message sealed for the link: [HS + counter, ciphertext of its parts]."""
    counter = channel.next_counter()
    prefix = SEALED + _COUNTER.pack(counter)
    parts = _parts(msg)
    plain = b"".join(_LENGTH.pack(len(p)) + p for p in parts)
    return [prefix, channel.seal(counter, prefix, plain)]


def is_sealed(frames: list[bytes]) -> bool:
    return len(frames) == 2 and len(frames[0]) == len(SEALED) + _COUNTER.size \
        and frames[0][:2] == SEALED


def _unpack(plain: bytes) -> list[bytes]:
    parts, at = [], 0
    while at < len(plain):
        if at + _LENGTH.size > len(plain):
            raise ProtocolError("malformed", "truncated part length")
        (n,) = _LENGTH.unpack_from(plain, at)
        at += _LENGTH.size
        if at + n > len(plain):
            raise ProtocolError("malformed", "truncated part")
        parts.append(plain[at:at + n])
        at += n
    if not parts:
        raise ProtocolError("malformed", "no header")
    return parts


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


def decode(frames: list[bytes], channel: Channel | None) -> Message:
    """The typed message; ProtocolError for anything forged, replayed, unknown or malformed.
    A sealed message is opened with `channel` (None: no session with its sender, so it is
    unauthenticated); an unsealed one must be of a kind that may travel in clear."""
    if is_sealed(frames):
        if channel is None:
            raise ProtocolError("unauthenticated")
        (counter,) = _COUNTER.unpack_from(frames[0], len(SEALED))
        parts = _unpack(channel.open(counter, frames[0], frames[1]))
        return _typed(parts, sealed=True)
    if len(frames) == 1 and frames[0][:2] == CLEAR:
        return _typed([frames[0][2:]], sealed=False)
    raise ProtocolError("malformed", "neither a sealed nor a join frame")


def _typed(body: list[bytes], sealed: bool) -> Message:
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
    if not sealed and cls.kind not in IN_CLEAR:
        raise ProtocolError("unauthenticated", f"a {cls.kind!r} message must be sealed")
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
