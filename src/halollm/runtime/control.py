"""The control plane's message format: JSON header + binary blobs + MAC, as zmq frames.

Control messages (join, plan, heartbeat, KV repair, replay, shutdown) travel over ZeroMQ,
which gives reliable, ordered delivery over TCP. Every message is authenticated with the
cluster key like the data plane's datagrams; no pickle, tensors travel as raw float32 bytes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
from typing import Any

import numpy as np
import torch

from halollm.runtime.protocol import MAC_SIZE, ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER = 1 << 20


def _mac(key: bytes, frames: list[bytes]) -> bytes:
    h = hashlib.blake2b(key=key, digest_size=MAC_SIZE)
    for f in frames:
        h.update(struct.pack(">Q", len(f)))
        h.update(f)
    return h.digest()


def pack(key: bytes, kind: str, blobs: list[bytes] | None = None, **fields: Any) -> list[bytes]:
    header = json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode()
    frames = [header, *(blobs or [])]
    return [*frames, _mac(key, frames)]


def unpack(key: bytes, frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """(header, blobs); ProtocolError for anything forged, truncated or malformed."""
    if len(frames) < 2:
        raise ProtocolError("malformed", "too few frames")
    *body, tag = frames
    if len(tag) != MAC_SIZE or not secrets.compare_digest(_mac(key, body), tag):
        raise ProtocolError("unauthenticated")
    if len(body[0]) > MAX_HEADER:
        raise ProtocolError("malformed", "header too large")
    try:
        header = json.loads(body[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed", f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise ProtocolError("malformed", "header has no kind")
    return header, body[1:]


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
