"""A bounded read of a GGUF file: header, metadata values and a map of its tensors.

Every length, count and offset is checked against what is left of the file before anything
is read or allocated (a forged header costs a few reads, not gigabytes); the tensors are
read-only numpy views of the memory map, laid out as the `gguf` package lays them out.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from halollm.errors import ModelLoadError

# GGUF metadata value types: struct codes of the scalars, and the two variable-length kinds.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS, _MAX_NESTING = 4, 4
_VERSIONS = (2, 3)
_UNREADABLE = object()  # a metadata value that is not UTF-8 text: left out, like gguf does


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGUF shape (innermost dimension first), its type, and its
    bytes as a read-only numpy view of the map (gguf's layout: float types as their numpy
    dtype, quantized types as uint8 rows of blocks)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


class _Walk:
    """A bounded read of a GGUF file's header, metadata and tensor table. Each length, count
    and offset is checked against what is left of the file before anything is read or
    allocated, so a forged header costs a few reads, not gigabytes. It replaces
    `gguf.GGUFReader` (which trusts every length and builds a numpy array per metadata
    element: 2.3 s for the default model's 49k-token vocabulary, against 0.1 s here); the
    `gguf` package still names the tensor types and dequantizes."""

    def __init__(self, path: Path, buf: Any, size: int) -> None:
        self.path, self.buf, self.size, self.pos, self.end = path, buf, size, 0, "<"

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: not a readable GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes at byte {self.pos}, beyond the end of "
                            f"the file ({self.size} bytes)")

    def read(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(self.end + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> bytes:
        n = self.read("Q", what)
        self.need(n, f"{what}: a string of {n} bytes")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def strings(self, count: int, what: str) -> list[str] | object:
        """`count` strings in a row (a vocabulary): the tight loop of the walk."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct(self.end + "Q")
        out: list[bytes] = []
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"{what}: string {i}")
            n = unpack.unpack_from(buf, pos)[0]
            if n > size - pos - 8:
                self.pos = pos + 8
                self.need(n, f"{what}: string {i} of {n} bytes")
            out.append(buf[pos + 8:pos + 8 + n])
            pos += 8 + n
        self.pos = pos
        try:
            return [raw.decode("utf-8") for raw in out]
        except UnicodeDecodeError:
            return _UNREADABLE

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One metadata value as Python data (numbers, str, lists)."""
        if vtype in _SCALARS:
            return self.read(_SCALARS[vtype], what)
        if vtype == _STRING:
            try:
                return self.string(what).decode("utf-8")
            except UnicodeDecodeError:
                return _UNREADABLE
        if vtype != _ARRAY:
            raise self.fail(f"{what}: unknown value type {vtype}")
        if depth >= _MAX_NESTING:
            raise self.fail(f"{what}: arrays nested more than {_MAX_NESTING} deep")
        itype = self.read("I", f"{what}: array type")
        count = self.read("Q", f"{what}: array length")
        if itype in _SCALARS:
            dtype = np.dtype(_SCALARS[itype]).newbyteorder(self.end)
            self.need(count * dtype.itemsize, f"{what}: an array of {count} {dtype.name} "
                                              "values")
            items = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return items
        if itype == _STRING:
            self.need(count * 8, f"{what}: an array of {count} strings")
            return self.strings(count, what)
        if itype == _ARRAY:
            self.need(count * 12, f"{what}: an array of {count} arrays")
            return [self.value(_ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.fail(f"{what}: unknown array element type {itype}")

    def metadata(self, n_kv: int) -> dict[str, Any]:
        """The n_kv entries, keys to values (values that are not UTF-8 text left out)."""
        self.need(n_kv * 13, f"the header's {n_kv} metadata entries (13 bytes or more each)")
        meta: dict[str, Any] = {}
        for i in range(n_kv):
            raw = self.string(f"metadata entry {i}: its key")
            try:
                key = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail(f"metadata entry {i}: the key is not UTF-8") from None
            vtype = self.read("I", f"metadata key {key}: its type")
            value = self.value(vtype, f"metadata key {key}")
            if key == "general.alignment" and (
                    vtype != 4 or value <= 0 or value & (value - 1)):
                raise self.fail("general.alignment must be a uint32 power of two")
            if value is not _UNREADABLE and not (
                    isinstance(value, list) and _UNREADABLE in value):
                meta[key] = value
        return meta

    def tensors(self, n_tensors: int, alignment: int) -> list[GGUFTensor]:
        import gguf

        self.need(n_tensors * 24, f"the header's {n_tensors} tensors (24 bytes or more each)")
        table = []
        for i in range(n_tensors):
            name = self.string(f"tensor {i}: its name").decode("utf-8", "replace")
            n_dims = self.read("I", f"tensor {name}: its number of dimensions")
            if n_dims > _MAX_DIMS:
                raise self.fail(f"tensor {name} has {n_dims} dimensions (at most {_MAX_DIMS})")
            dims = tuple(self.read("Q", f"tensor {name}: its shape") for _ in range(n_dims))
            ttype = self.read("I", f"tensor {name}: its type")
            offset = self.read("Q", f"tensor {name}: its offset")
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise self.fail(f"tensor {name} has unknown type {ttype}") from None
            elements = math.prod(dims)
            if elements % block or (dims and dims[0] % block):
                raise self.fail(f"tensor {name}: its rows of {dims[0] if dims else 1} "
                                f"elements are not whole blocks of {block}")
            table.append((name, dims, qtype, offset, elements // block * block_bytes))
        start = self.pos + -self.pos % alignment
        out, seen = [], set()
        for name, dims, qtype, offset, nbytes in table:
            if name in seen:
                raise self.fail(f"tensor {name} appears twice")
            seen.add(name)
            at = start + offset
            if at + nbytes > self.size:
                raise self.fail(f"tensor {name}: its data (bytes {at} to {at + nbytes}) "
                                f"extends beyond the end of the file ({self.size} bytes)")
            out.append(GGUFTensor(name, dims, qtype, self._data(at, dims, qtype, nbytes)))
        return out

    def _data(self, at: int, dims: tuple[int, ...], qtype: Any, nbytes: int) -> np.ndarray:
        """The tensor's bytes as gguf lays them out: outermost dimension first; float and
        integer types as their numpy dtype, block types as rows of bytes."""
        shape = tuple(reversed(dims)) or (1,)
        dtype = _PLAIN_DTYPES.get(qtype.name)
        if dtype is None:
            dtype = np.dtype(np.uint8)
            shape = (*shape[:-1], nbytes // max(math.prod(shape[:-1]), 1))
        else:
            dtype = np.dtype(dtype).newbyteorder(self.end)
        count = nbytes // dtype.itemsize
        return np.frombuffer(self.buf, dtype, count, at).reshape(shape)


_PLAIN_DTYPES = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4",
                 "I64": "i8"}


def read_gguf(path: Path, buf: Any) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """The metadata and tensors of the GGUF file mapped at `buf`; one clear ModelLoadError if
    its lengths, counts or offsets do not fit the file. Reads are bounded; nothing is
    allocated per declared element."""
    size = len(buf)
    if size < 24:
        raise ModelLoadError(f"{path}: not a GGUF file ({size} bytes)")
    if buf[:4] != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic)")
    walk = _Walk(path, buf, size)
    walk.pos = 4
    version = walk.read("I", "the version")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        walk.end, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in _VERSIONS:
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported "
                             f"(supported: {', '.join(map(str, _VERSIONS))})")
    n_tensors = walk.read("Q", "the tensor count")
    n_kv = walk.read("Q", "the metadata count")
    meta = walk.metadata(n_kv)
    return meta, walk.tensors(n_tensors, int(meta.get("general.alignment", 32)))
