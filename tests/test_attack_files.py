"""Forged model files (issue 17): every lie a GGUF header can tell about lengths, counts,
offsets or required metadata is one clear HaloError line, found fast, in bounded memory.

The files are built byte by byte here (not with the `gguf` package's writer), so a forged
length really is what the parser meets. Loads that could blow up run in a child process
under an address-space limit: a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from halollm.errors import HaloError
from halollm.model.gguf_file import GGUFModelFile
from tests.conftest import one_clear_line, run_halo

U8, U32, I32, F32, STRING, ARRAY, U64 = 0, 4, 5, 6, 8, 9, 10
GGML_F32 = 0


def _s(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _u32(key: str, value: int) -> bytes:
    return _kv(key, U32, struct.pack("<I", value))


def _str(key: str, value: str) -> bytes:
    return _kv(key, STRING, _s(value))


def _str_array(key: str, items: list[str]) -> bytes:
    return _kv(key, ARRAY, struct.pack("<IQ", STRING, len(items)) + b"".join(map(_s, items)))


def _gguf(kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int]] = (),
          data: bytes = b"", n_kv: int | None = None, n_tensors: int | None = None,
          offsets: dict[str, int] | None = None) -> bytes:
    """A GGUF v3 file: header, metadata, tensor infos (F32), 32-byte aligned data."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    infos, at = b"", 0
    for name, dims, offset in tensors:
        if offsets and name in offsets:
            offset = offsets[name]
        infos += _s(name) + struct.pack("<I", len(dims)) + struct.pack(
            f"<{len(dims)}Q", *dims) + struct.pack("<IQ", GGML_F32, offset)
        at = max(at, offset)
    body = head + b"".join(kvs) + infos
    body += b"\0" * (-len(body) % 32)
    return body + data


HIDDEN, VOCAB, FFN = 8, 16, 16
TOKENS = ["<s>", "</s>"] + [chr(ord("a") + i) for i in range(VOCAB - 2)]


def _model_kvs(drop: str = "", **override: int) -> list[bytes]:
    ints = {"llama.embedding_length": HIDDEN, "llama.feed_forward_length": FFN,
            "llama.block_count": 1, "llama.attention.head_count": 2,
            "llama.attention.head_count_kv": 2, "llama.context_length": 64}
    ints.update({f"llama.{k.replace('__', '.')}": v for k, v in override.items()})
    kvs = [_str("general.architecture", "llama")]
    kvs += [_u32(k, v) for k, v in ints.items() if k != drop]
    return kvs + [_str("tokenizer.ggml.model", "gpt2"), _str_array("tokenizer.ggml.tokens",
                                                                    TOKENS)]


def _model(drop: str = "", offsets: dict[str, int] | None = None, **override: int) -> bytes:
    """A small llama GGUF: metadata and a token embedding (the config's witness)."""
    embed = np.zeros((VOCAB, HIDDEN), dtype=np.float32).tobytes()
    return _gguf(_model_kvs(drop, **override), [("token_embd.weight", (HIDDEN, VOCAB), 0)],
                 embed, offsets=offsets)


def _load_error(path: Path) -> str:
    with pytest.raises(HaloError) as exc:
        GGUFModelFile(path)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    return message


_CHILD = textwrap.dedent("""
    import json, sys, time
    from halollm.errors import HaloError
    from halollm.model.gguf_file import GGUFModelFile

    def hwm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    before, t0 = hwm_kb(), time.monotonic()
    try:
        GGUFModelFile(sys.argv[1])
        error = None
    except HaloError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "grew_kb": hwm_kb() - before,
                      "seconds": time.monotonic() - t0}))
""")

LIMIT_AS = 2 << 30  # what the child may map at most; a 2^40-element list needs far more


def _load_in_child(path: Path) -> dict:
    """Open `path` in a child capped at LIMIT_AS of address space: its error, its peak
    memory growth (VmHWM) and how long the open took."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))

    r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                       text=True, timeout=120, preexec_fn=cap,
                       env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                            "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


HEADER = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)


@pytest.mark.parametrize("name,blob,named", [
    # the review's 114-byte file: one key, an array declaring 2^40 uint8 elements
    ("array_count", HEADER + _kv("general.architecture", ARRAY, struct.pack("<IQ", U8, 1 << 40))
     + b"\0" * 46, ["general.architecture", "1099511627776", "array"]),
    ("string_array_count", HEADER + _kv("tokenizer.ggml.tokens", ARRAY,
                                        struct.pack("<IQ", STRING, 1 << 40)) + b"\0" * 40,
     ["tokenizer.ggml.tokens", "1099511627776"]),
    ("string_length", HEADER + _kv("general.name", STRING, _s(b"x" * 8, 1 << 40)),
     ["general.name", "1099511627776"]),
    ("key_length", HEADER + _s(b"general", 1 << 40) + b"\0" * 30, ["key", "1099511627776"]),
    ("kv_count", b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40) + b"\0" * 60,
     ["1099511627776", "metadata"]),
    ("tensor_count", b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0) + b"\0" * 60,
     ["1099511627776", "tensor"]),
])
def test_forged_lengths_fail_fast_in_bounded_memory(tmp_path, name, blob, named):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(blob)
    out = _load_in_child(path)
    assert out["error"] is not None, out
    for word in named:
        assert word in out["error"], out["error"]
    assert "\n" not in out["error"]
    assert out["grew_kb"] < 64 * 1024, out  # bounded: well under 64 MB, not gigabytes
    assert out["seconds"] < 10, out


def test_tensor_beyond_the_file(tmp_path):
    path = tmp_path / "offset.gguf"
    path.write_bytes(_model(offsets={"token_embd.weight": 1 << 20}))
    msg = _load_error(path)
    assert "token_embd.weight" in msg and "beyond the end" in msg, msg
    out = _load_in_child(path)
    assert out["error"] == msg and out["grew_kb"] < 64 * 1024


def test_tensor_with_too_many_elements(tmp_path):
    # 2^62 float32 elements: an offset+size check that overflowed or allocated would not
    # say this
    path = tmp_path / "dims.gguf"
    blob = _gguf(_model_kvs(), [("token_embd.weight", (1 << 31, 1 << 31), 0)], b"\0" * 64)
    path.write_bytes(blob)
    msg = _load_error(path)
    assert "token_embd.weight" in msg and "beyond the end" in msg, msg


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(_model()[:150])
    msg = _load_error(path)
    assert "end of the file" in msg or "beyond the end" in msg, msg


@pytest.mark.parametrize("key", ["embedding_length", "attention.head_count",
                                 "feed_forward_length", "block_count"])
def test_missing_required_metadata_names_the_key(tmp_path, key):
    path = tmp_path / "missing.gguf"
    path.write_bytes(_model(drop=f"llama.{key}"))
    assert f"model file lacks llama.{key}" in _load_error(path)


@pytest.mark.parametrize("key,value", [("attention__head_count", 0),
                                       ("embedding_length", 0), ("block_count", 0),
                                       ("attention__head_count_kv", 0),
                                       ("context_length", 0)])
def test_zero_metadata_names_the_key(tmp_path, key, value):
    path = tmp_path / "zero.gguf"
    path.write_bytes(_model(**{key: value}))
    msg = _load_error(path)
    assert f"llama.{key.replace('__', '.')} = 0" in msg and "positive" in msg, msg


def test_wrongly_typed_metadata_names_the_key(tmp_path):
    kvs = [kv for kv in _model_kvs(drop="llama.embedding_length")]
    kvs.append(_str("llama.embedding_length", "eight"))
    path = tmp_path / "typed.gguf"
    embed = np.zeros((VOCAB, HIDDEN), dtype=np.float32).tobytes()
    path.write_bytes(_gguf(kvs, [("token_embd.weight", (HIDDEN, VOCAB), 0)], embed))
    msg = _load_error(path)
    assert "llama.embedding_length" in msg and "'eight'" in msg, msg


def test_embedding_width_must_match_the_metadata(tmp_path):
    path = tmp_path / "width.gguf"
    path.write_bytes(_model(embedding_length=12))
    msg = _load_error(path)
    assert "token_embd.weight" in msg and "llama.embedding_length" in msg, msg


def test_the_honest_file_still_opens(tmp_path):
    """The control: the same builder without a lie gives a readable file."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(_model())
    f = GGUFModelFile(path)
    try:
        assert f.config.hidden_size == HIDDEN and f.config.n_heads == 2
        assert f.tensor("embed").shape == (VOCAB, HIDDEN)
    finally:
        f.close()


def test_tokenizer_metadata_is_checked(tmp_path):
    from halollm.model.tokenizer import Tokenizer

    meta = {"tokenizer.ggml.model": "gpt2"}
    with pytest.raises(HaloError, match="lacks tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata(meta)
    meta["tokenizer.ggml.tokens"] = TOKENS
    meta["tokenizer.ggml.token_type"] = [1, 1]
    with pytest.raises(HaloError, match="tokenizer.ggml.token_type"):
        Tokenizer.from_gguf_metadata(meta)
    meta["tokenizer.ggml.token_type"] = [1] * VOCAB
    meta["tokenizer.ggml.eos_token_id"] = VOCAB + 5
    with pytest.raises(HaloError, match="tokenizer.ggml.eos_token_id"):
        Tokenizer.from_gguf_metadata(meta)


@pytest.mark.parametrize("kind", ["array", "missing", "zero_heads", "offset"])
def test_cli_shows_one_clear_line(tmp_path, kind):
    path = tmp_path / f"{kind}.gguf"
    if kind == "array":
        path.write_bytes(HEADER + _kv("general.architecture", ARRAY,
                                      struct.pack("<IQ", U8, 1 << 40)) + b"\0" * 46)
    elif kind == "missing":
        path.write_bytes(_model(drop="llama.embedding_length"))
    elif kind == "zero_heads":
        path.write_bytes(_model(attention__head_count=0))
    else:
        path.write_bytes(_model(offsets={"token_embd.weight": 1 << 30}))
    r = run_halo("generate", "--model", str(path), "Hello", timeout=120,
                 env={"OMP_NUM_THREADS": "1"})
    line = one_clear_line(r)
    assert str(path) in line
    assert {"array": "1099511627776", "missing": "lacks llama.embedding_length",
            "zero_heads": "llama.attention.head_count = 0",
            "offset": "beyond the end"}[kind] in line
