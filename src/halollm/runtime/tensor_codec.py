"""Message bodies: the groups a message covers and one [T, d] tensor in a wire format."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch

from halollm.runtime.protocol import ProtocolError

WIRE_FP32, WIRE_FP16, WIRE_BF16, WIRE_INT8 = 0, 1, 2, 3
WIRE_NAMES = {"fp32": WIRE_FP32, "fp16": WIRE_FP16, "bf16": WIRE_BF16, "int8": WIRE_INT8}
_TORCH = {WIRE_FP32: torch.float32, WIRE_FP16: torch.float16, WIRE_BF16: torch.bfloat16}
_ITEM = {WIRE_FP32: 4, WIRE_FP16: 2, WIRE_BF16: 2, WIRE_INT8: 1}
_U16 = struct.Struct(">H")
_EXPONENT = {WIRE_FP16: 0x7C00, WIRE_BF16: 0x7F80}


def wire_for_dtype(dtype: torch.dtype) -> int:
    return next(k for k, v in _TORCH.items() if v == dtype)


def body_size(wire: int, ntok: int, dim: int, n_groups: int) -> int:
    scales = 4 * ntok if wire == WIRE_INT8 else 0
    return 2 + 2 * n_groups + scales + _ITEM[wire] * ntok * dim


def encode_body(x: torch.Tensor, wire: int, groups: Sequence[int] = ()) -> bytes:
    """groups (u16 count + u16 each), then x [T, d] in the wire format. int8 is symmetric
    per row: float32 scales first, then the int8 values."""
    head = struct.pack(f">H{len(groups)}H", len(groups), *groups)
    if wire == WIRE_INT8:
        xf = x.float()
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
        q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
        return head + scale.numpy().astype(">f4").tobytes() + q.numpy().tobytes()
    t = x.to(_TORCH[wire]).contiguous()
    if wire == WIRE_BF16:
        return head + t.view(torch.int16).numpy().tobytes()
    return head + t.numpy().tobytes()


def decode_body(body: bytes, wire: int, ntok: int, dim: int) -> tuple[tuple[int, ...],
                                                                       torch.Tensor]:
    """(groups, tensor [ntok, dim]) in the wire's own dtype (float32 for int8), with no
    copy where possible; ProtocolError if the body does not fit or holds non-finite values."""
    if wire not in _ITEM:
        raise ProtocolError("malformed", f"unknown wire format {wire}")
    if len(body) < 2:
        raise ProtocolError("malformed", "body too short")
    (n,) = _U16.unpack_from(body)
    if len(body) != body_size(wire, ntok, dim, n):
        raise ProtocolError("malformed", f"body of {len(body)} bytes does not hold "
                                         f"{ntok}x{dim} values and {n} groups")
    groups = struct.unpack_from(f">{n}H", body, 2) if n else ()
    off = 2 + 2 * n
    if wire == WIRE_INT8:
        scale = np.frombuffer(body, dtype=">f4", count=ntok, offset=off).astype(np.float32)
        q = np.frombuffer(body, dtype=np.int8, count=ntok * dim, offset=off + 4 * ntok)
        arr = q.reshape(ntok, dim).astype(np.float32) * scale[:, None]
        finite = np.isfinite(arr).all()
        x = torch.from_numpy(arr)
    elif wire == WIRE_FP32:
        arr = np.frombuffer(body, dtype=np.float32, count=ntok * dim, offset=off)
        finite = np.isfinite(arr).all()
        x = torch.from_numpy(arr.copy()).reshape(ntok, dim)
    else:  # 16-bit: finite unless the exponent bits are all ones (checked on the raw bits)
        bits = np.frombuffer(body, dtype=np.int16, count=ntok * dim, offset=off)
        exponent = _EXPONENT[wire]
        finite = (bits & exponent).max() < exponent  # (sign bit masked off: 0x7C00, 0x7F80)
        x = torch.from_numpy(bits.copy()).view(_TORCH[wire]).view(ntok, dim)
    if not finite:
        raise ProtocolError("malformed", "non-finite values")
    return groups, x
