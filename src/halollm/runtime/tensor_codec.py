"""Message bodies: the groups a message covers and one [T, d] tensor in a wire format."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch

from halollm.runtime.protocol import ProtocolError
from halollm.runtime.transport import NATIVE

WIRE_FP32, WIRE_FP16, WIRE_BF16, WIRE_INT8 = 0, 1, 2, 3
WIRE_NAMES = {"fp32": WIRE_FP32, "fp16": WIRE_FP16, "bf16": WIRE_BF16, "int8": WIRE_INT8}
_TORCH = {WIRE_FP32: torch.float32, WIRE_FP16: torch.float16, WIRE_BF16: torch.bfloat16}
_DECODED = {**_TORCH, WIRE_INT8: torch.float32}  # what decode_body gives for each wire
_ITEM = {WIRE_FP32: 4, WIRE_FP16: 2, WIRE_BF16: 2, WIRE_INT8: 1}
_U16 = struct.Struct(">H")
_EXPONENT = {WIRE_FP16: 0x7C00, WIRE_BF16: 0x7F80}
Q8_BLOCK = 32  # int8 wire: values per block, each block with its own float16 scale (Q8_0's)


def wire_for_dtype(dtype: torch.dtype) -> int:
    return next(k for k, v in _TORCH.items() if v == dtype)


def _blocks(dim: int) -> int:
    return -(-dim // Q8_BLOCK)


def body_size(wire: int, ntok: int, dim: int, n_groups: int) -> int:
    if wire == WIRE_INT8:  # float16 scales, then the int8 values (the last block padded)
        return 2 + 2 * n_groups + ntok * _blocks(dim) * (2 + Q8_BLOCK)
    return 2 + 2 * n_groups + _ITEM[wire] * ntok * dim


def _q8_encode(x: torch.Tensor) -> bytes:
    """x [T, d] as blocks of 32 values: symmetric int8 with one float16 scale per block, as
    llama.cpp's Q8_0 and distributed-llama's q80 sync buffers hold activations. 1.06 bytes
    a value (half of bf16) with the error of one outlier confined to its block. Values
    beyond float16's range times 127 (8.3e6) give an infinite scale, refused on arrival."""
    t, d = x.shape
    a = x.detach().float().numpy()
    nb = _blocks(d)
    if nb * Q8_BLOCK != d:
        a = np.pad(a, ((0, 0), (0, nb * Q8_BLOCK - d)))
    blocks = a.reshape(t, nb, Q8_BLOCK)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite input: refused on arrival
        scale = (np.abs(blocks).max(axis=-1) * (1 / 127.0)).astype(np.float16)
        s = scale.astype(np.float32)
        inverse = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = blocks * inverse[..., None]
        np.rint(q, out=q)
        np.clip(q, -127, 127, out=q)
        values = q.astype(np.int8)
    return scale.astype("<f2").tobytes() + values.tobytes()


def encode_body(x: torch.Tensor, wire: int, groups: Sequence[int] = ()) -> bytes:
    """groups (u16 count + u16 each), then x [T, d] in the wire format (int8: 32-value
    blocks, `_q8_encode`)."""
    head = struct.pack(f">H{len(groups)}H", len(groups), *groups)
    if wire == WIRE_INT8:
        return head + _q8_encode(x)
    t = x.to(_TORCH[wire]).contiguous()
    if wire == WIRE_BF16:
        return head + t.view(torch.int16).numpy().tobytes()
    return head + t.numpy().tobytes()


def check_body(body: bytes, wire: int, ntok: int, dim: int) -> int:
    """Where body's values start, once it is known to hold groups and ntok x dim finite
    values in `wire`; ProtocolError if it does not fit or holds non-finite values."""
    if wire not in _ITEM:
        raise ProtocolError("malformed", f"unknown wire format {wire}")
    if len(body) < 2:
        raise ProtocolError("malformed", "body too short")
    (n,) = _U16.unpack_from(body)
    if len(body) != body_size(wire, ntok, dim, n):
        raise ProtocolError("malformed", f"body of {len(body)} bytes does not hold "
                                         f"{ntok}x{dim} values and {n} groups")
    off = 2 + 2 * n
    if wire == WIRE_INT8:  # the float16 scales: nothing is finite after a non-finite one
        bits = np.frombuffer(body, dtype="<u2", count=ntok * _blocks(dim), offset=off)
        finite = (bits & _EXPONENT[WIRE_FP16]).max() < _EXPONENT[WIRE_FP16]
    elif wire == WIRE_FP32:
        finite = np.isfinite(np.frombuffer(body, dtype=np.float32, count=ntok * dim,
                                           offset=off)).all()
    else:  # 16-bit: finite unless the exponent bits are all ones (checked on the raw bits;
        # the sign bit is outside the mask: 0x7C00, 0x7F80)
        bits = np.frombuffer(body, dtype=np.int16, count=ntok * dim, offset=off)
        finite = (bits & _EXPONENT[wire]).max() < _EXPONENT[wire]
    if not finite:
        raise ProtocolError("malformed", "non-finite values")
    return off


def _values(body: bytes, wire: int, ntok: int, dim: int, off: int) -> torch.Tensor:
    """The [ntok, dim] values of a checked body (float32 for int8, else the wire's dtype)."""
    if wire == WIRE_INT8:
        nb = ntok * _blocks(dim)
        scale = np.frombuffer(body, dtype="<f2", count=nb, offset=off).astype(np.float32)
        q = np.frombuffer(body, dtype=np.int8, count=nb * Q8_BLOCK, offset=off + 2 * nb)
        arr = (q.reshape(nb, Q8_BLOCK) * scale[:, None]).reshape(ntok, -1)
        return torch.from_numpy(arr if arr.shape[1] == dim else arr[:, :dim].copy())
    dtype = np.float32 if wire == WIRE_FP32 else np.int16
    arr = np.frombuffer(body, dtype=dtype, count=ntok * dim, offset=off).copy()
    x = torch.from_numpy(arr)
    return (x if wire == WIRE_FP32 else x.view(_TORCH[wire])).view(ntok, dim)


def decode_body(body: bytes, wire: int, ntok: int, dim: int, native: object | None = NATIVE
                ) -> tuple[tuple[int, ...], torch.Tensor]:
    """(groups, tensor [ntok, dim]) in the wire's own dtype (float32 for int8);
    ProtocolError if the body does not fit or holds non-finite values. `native`: the C data
    path's module, which checks and copies in one call (the same values and refusals as the
    Python code below it; a worker decodes every activation it gets)."""
    if native is not None:
        try:
            groups, raw = native.body_values(body, wire, ntok, dim)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise ProtocolError("malformed", str(exc)) from None
        return groups, torch.frombuffer(raw, dtype=_DECODED[wire]).view(ntok, dim)
    off = check_body(body, wire, ntok, dim)
    n = (off - 2) // 2
    groups = struct.unpack_from(f">{n}H", body, 2) if n else ()
    return groups, _values(body, wire, ntok, dim, off)


def sum_bodies(bodies: Sequence[tuple[bytes, int]], wire: int, ntok: int, dim: int
               ) -> torch.Tensor:
    """The float32 sum [ntok, dim] of checked bodies in one wire, each with its values'
    offset (`check_body`): a round's partials decoded together. 16-bit bodies alike in
    layout become one [k, ntok * dim] tensor (a tensor per partial cost more than the sum)."""
    offsets = {off for _, off in bodies}
    if wire in (WIRE_FP16, WIRE_BF16) and len(offsets) == 1:
        (off,) = offsets
        arr = np.frombuffer(b"".join(b for b, _ in bodies), dtype=np.int16)
        rows = arr.reshape(len(bodies), -1)[:, off // 2:]
        values = torch.from_numpy(rows.copy()).view(_TORCH[wire])
    else:
        values = torch.stack([_values(b, wire, ntok, dim, off) for b, off in bodies])
    return values.float().sum(0).view(ntok, dim)


def place_bodies(bodies: Sequence[tuple[bytes, int, int, int]], wire: int, dim: int
                 ) -> torch.Tensor:
    """Checked one-token bodies, each (body, where its values start, offset, length), placed
    at their offsets in one float32 [1, dim] (zeros elsewhere): the LM head's rows, concatenated."""
    out = torch.zeros(1, dim)
    for body, off, at, n in bodies:
        out[0, at:at + n] += _values(body, wire, 1, n, off).float().view(-1)
    return out
