"""A per-model file of neuron groups already in the kernels' packed layout.

Streaming a group from the model file means re-laying out its GGUF blocks (unpacking nibbles,
``_convert_weight_to_int4pack_for_cpu``, stacking q/k/v and gate/up) every time: ~70 MB/s on
this VM. The group cache does that once per model, format, partition and CPU int4 layout, and
writes each group's matrices as their bytes; loading a group is then one ``preadv`` of its
byte range into a fresh buffer (the copy the store's budget counts) and wrapping slices of it
as ``Int4Weight``/``Int8Weight``/... without any conversion.

File layout: ``MAGIC`` padded to ALIGN bytes; each group's tensors (each ALIGN-aligned) one
group after the other; a JSON index (the key, and per group its byte range, crc32 and the
structure of its matrices); the footer ``<index length u64><index crc32 u64>MAGIC``. It is
written to a temporary file and renamed into place (atomic); a file whose footer, index, key,
size or any group's crc32 does not check out is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from halollm.groups import GroupId
from halollm.loader.weights import GroupWeights
from halollm.model.formats import Matrix, Scattered
from halollm.model.quant import Int4PairWeight, Int4Weight, Int8Weight, RowConcat

MAGIC = b"HALOGRP1"
VERSION = 1
ALIGN = 64
_FOOTER = struct.Struct("<QQ8s")
POOL = 4  # buffers of evicted groups kept for reuse (see GroupCache.release)


class CacheInvalid(Exception):
    """A cache file that must not be used (and is rebuilt)."""


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# -- matrices <-> (structure, byte chunks) ------------------------------------------------

def _put(t: torch.Tensor, chunks: list[np.ndarray], size: list[int]) -> dict[str, Any]:
    data = t.detach().contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else \
        np.zeros(0, dtype=np.uint8)
    ref = {"o": size[0], "n": int(data.nbytes), "d": str(t.dtype).removeprefix("torch."),
           "s": list(t.shape)}
    chunks.append(data)
    size[0] = _pad(size[0] + int(data.nbytes))
    return ref


def encode(m: Matrix | None, chunks: list[np.ndarray], size: list[int]) -> Any:
    """The structure of matrix `m`, its tensors appended to `chunks` (size[0]: bytes so far,
    each chunk at an ALIGN-aligned offset)."""
    if m is None:
        return None
    if isinstance(m, torch.Tensor):
        return {"k": "tensor", "t": _put(m, chunks, size)}
    if isinstance(m, Int4Weight):
        return {"k": "int4", "packed": _put(m.packed, chunks, size),
                "sz": _put(m.scale_zeros, chunks, size), "out": m.out_features,
                "in": m.in_features}
    if isinstance(m, Int8Weight):
        return {"k": "int8", "q": _put(m.q, chunks, size), "scale": _put(m.scale, chunks, size),
                "in": m.in_features}
    if isinstance(m, Int4PairWeight):
        return {"k": "int4x2", "hi": encode(m.hi, chunks, size), "lo": encode(m.lo, chunks, size)}
    if isinstance(m, RowConcat):
        return {"k": "rows", "parts": [encode(p, chunks, size) for p in m.parts]}
    if isinstance(m, Scattered):
        return {"k": "scattered", "inner": encode(m.inner, chunks, size),
                "pos": _put(m.pos, chunks, size)}
    raise TypeError(f"cannot cache a matrix of type {type(m).__name__}")


def _get(ref: dict[str, Any], buf: torch.Tensor) -> torch.Tensor:
    dtype = getattr(torch, ref["d"])
    return buf[ref["o"]:ref["o"] + ref["n"]].view(dtype).reshape(ref["s"])


def decode(spec: Any, buf: torch.Tensor) -> Matrix | None:
    """The matrix of structure `spec` over the group's bytes `buf` (views, no copies)."""
    if spec is None:
        return None
    kind = spec["k"]
    if kind == "tensor":
        return _get(spec["t"], buf)
    if kind == "int4":
        return Int4Weight(_get(spec["packed"], buf), _get(spec["sz"], buf), spec["out"],
                          spec["in"])
    if kind == "int8":
        return Int8Weight(_get(spec["q"], buf), _get(spec["scale"], buf), spec["in"])
    if kind == "int4x2":
        return Int4PairWeight(decode(spec["hi"], buf), decode(spec["lo"], buf))  # type: ignore[arg-type]
    if kind == "rows":
        return RowConcat([decode(p, buf) for p in spec["parts"]])  # type: ignore[misc]
    if kind == "scattered":
        return Scattered(decode(spec["inner"], buf), _get(spec["pos"], buf).numpy())  # type: ignore[arg-type]
    raise CacheInvalid(f"unknown matrix kind {kind!r}")


def gid_key(g: GroupId) -> str:
    return str(g)


_HASHES: dict[tuple[str, int, int], str] = {}


def model_hash(path: Path) -> str:
    """The model's content hash (sha256 of its bytes), computed once per file version."""
    from halollm.model.loader import content_hash

    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = content_hash(path)
    return _HASHES[memo]


def cache_key(model_hash: str, fmt: str, partition_json: str) -> dict[str, Any]:
    """What a cache file is valid for: the model's content, the weight format, the partition
    (every group's units) and this CPU's int4 packing layout."""
    from halollm.model.quant import int4_layout

    lay = int4_layout()
    return {"version": VERSION, "model_sha256": model_hash, "format": fmt,
            "partition_sha256": hashlib.sha256(partition_json.encode()).hexdigest(),
            "int4_layout": [lay.block_n, lay.offset.tolist(), lay.shift.tolist()]}


def cache_path(key: dict[str, Any]) -> Path:
    """Where the cache for `key` lives: <halo cache dir>/groups/<model>-<format>-<...>.bin."""
    from halollm.paths import cache_dir

    rest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "groups" / f"{key['model_sha256'][:16]}-{key['format']}-{rest}.bin"


# -- writing ------------------------------------------------------------------------------

def write_cache(path: Path, key: dict[str, Any], order: Sequence[GroupId],
                read: Callable[[GroupId], GroupWeights], say: Callable[[str], None]) -> None:
    """Pack every group of `order` (read with `read`) into `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    groups: dict[str, Any] = {}
    t0, last = time.perf_counter(), 0.0
    try:
        with tmp.open("wb") as f:
            f.write(MAGIC.ljust(ALIGN, b"\0"))
            for n, g in enumerate(order, 1):
                groups[gid_key(g)] = _write_group(f, read(g))
                if time.perf_counter() - last > 2 or n == len(order):
                    last = time.perf_counter()
                    say(f"  {n}/{len(order)} groups, {f.tell() / 2**20:.1f} MiB, "
                        f"{last - t0:.1f} s")
            index = json.dumps({"key": key, "groups": groups, "data_end": f.tell()}).encode()
            f.write(index)
            f.write(_FOOTER.pack(len(index), zlib.crc32(index), MAGIC))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_group(f: Any, w: GroupWeights) -> dict[str, Any]:
    chunks: list[np.ndarray] = []
    size = [0]
    spec = [encode(m, chunks, size) for m in w.tensors]
    start, crc = f.tell(), 0
    for c in chunks:
        f.write(memoryview(c))
        crc = zlib.crc32(memoryview(c), crc)
        pad = _pad(c.nbytes) - c.nbytes
        if pad:
            f.write(b"\0" * pad)
            crc = zlib.crc32(b"\0" * pad, crc)
    return {"off": start, "len": f.tell() - start, "crc": crc, "spec": spec,
            "file_bytes": w.file_bytes}


# -- reading ------------------------------------------------------------------------------

def read_index(path: Path, key: dict[str, Any], order: Sequence[GroupId]) -> dict[str, Any]:
    """The index of a cache file, after checking its footer, key, groups and every group's
    crc32; CacheInvalid (with the reason) if anything is off."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < ALIGN + _FOOTER.size or f.read(len(MAGIC)) != MAGIC:
                raise CacheInvalid("not a group cache file (or truncated)")
            f.seek(size - _FOOTER.size)
            n, crc, magic = _FOOTER.unpack(f.read(_FOOTER.size))
            if magic != MAGIC or n > size - _FOOTER.size - ALIGN:
                raise CacheInvalid("truncated (no footer)")
            f.seek(size - _FOOTER.size - n)
            raw = f.read(n)
            if zlib.crc32(raw) != crc:
                raise CacheInvalid("index checksum mismatch")
            index = json.loads(raw)
            _check_index(index, key, order, size - _FOOTER.size - n)
            _check_groups(f, index["groups"])
            return index
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CacheInvalid(f"unreadable ({e})") from e


def _check_index(index: dict[str, Any], key: dict[str, Any], order: Sequence[GroupId],
                 data_end: int) -> None:
    if index.get("key") != key:
        raise CacheInvalid("made for another model, format, partition or int4 layout")
    if index.get("data_end") != data_end:
        raise CacheInvalid("size does not match its index")
    groups = index["groups"]
    if set(groups) != {gid_key(g) for g in order}:
        raise CacheInvalid("its groups are not this partition's")
    for e in groups.values():
        if e["off"] < ALIGN or e["off"] + e["len"] > data_end or e["off"] % ALIGN:
            raise CacheInvalid("a group lies outside the data")


def _check_groups(f: Any, groups: dict[str, Any]) -> None:
    """crc32 of every group's bytes (one sequential pass over the file)."""
    for name, e in sorted(groups.items(), key=lambda kv: kv[1]["off"]):
        f.seek(e["off"])
        crc, left = 0, e["len"]
        while left:
            block = f.read(min(left, 1 << 22))
            if not block:
                raise CacheInvalid(f"truncated in group {name}")
            crc = zlib.crc32(block, crc)
            left -= len(block)
        if crc != e["crc"]:
            raise CacheInvalid(f"group {name} is corrupt (checksum mismatch)")


class GroupCache:
    """An open, checked cache file: `load(gid)` reads one group's bytes and wraps them."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path, self.groups = path, index["groups"]
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._live: dict[GroupId, torch.Tensor] = {}  # the buffer of each loaded group
        self._free: dict[int, list[torch.Tensor]] = {}  # buffers of released groups, by size

    @classmethod
    def open_or_build(cls, path: Path, key: dict[str, Any], order: Sequence[GroupId],
                      read: Callable[[GroupId], GroupWeights],
                      say: Callable[[str], None] | None = None) -> GroupCache:
        """The cache at `path`, built first if missing or unusable (the reason is said)."""
        say = say or _stderr
        if path.exists():
            try:
                return cls(path, read_index(path, key, order))
            except CacheInvalid as e:
                say(f"halo: the group cache {path} is not usable ({e}): rebuilding it")
        say(f"halo: packing {len(order)} groups into the group cache {path} (once per model, "
            "format and partition)…")
        write_cache(path, key, order, read, say)
        return cls(path, read_index(path, key, order))

    def size(self, gid: GroupId) -> int:
        """Bytes a loaded copy of the group holds (its tensors and their alignment)."""
        return int(self.groups[gid_key(gid)]["len"])

    def load(self, gid: GroupId) -> GroupWeights:
        e = self.groups[gid_key(gid)]
        with self._lock:
            free = self._free.get(e["len"])
            buf = free.pop() if free else torch.empty(e["len"], dtype=torch.uint8)
            self._live[gid] = buf
        if self._fd is None:
            raise RuntimeError("the group cache is closed")
        got = os.preadv(self._fd, [memoryview(buf.numpy())], e["off"])
        if got != e["len"]:
            raise OSError(f"short read of group {gid_key(gid)} from {self.path}")
        return GroupWeights(tuple(decode(s, buf) for s in e["spec"]), int(e["len"]))

    def release(self, gid: GroupId) -> None:
        """The store evicted `gid` and nothing computes with it any more: its buffer is kept
        (at most POOL of them) for the next load of the same size. Streaming otherwise frees
        and allocates ~a budget's worth of buffers per token, which the allocator keeps
        (measured: a 25% budget's process held as much anonymous memory as a 100% one)."""
        with self._lock:
            buf = self._live.pop(gid, None)
            if buf is not None and sum(map(len, self._free.values())) < POOL:
                self._free.setdefault(buf.numel(), []).append(buf)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
