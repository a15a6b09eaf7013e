"""The data-plane codec and control-message format: round trips, and hostile input."""

from __future__ import annotations

import socket
import struct
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from halollm.runtime import protocol
from halollm.runtime.protocol import ACTIVATION, PARTIAL, ProtocolError, Reassembler, RoundTag
from halollm.runtime.tensor_codec import (
    WIRE_BF16,
    WIRE_FP16,
    WIRE_FP32,
    WIRE_INT8,
    decode_body,
    encode_body,
)
from halollm.runtime.transport import UdpEndpoint

KEY = b"k" * 32
TAG = RoundTag(session=7, epoch=1, request=3, pos=42, ntok=1, layer=5, phase=1)


def _roundtrip(body: bytes, mtu: int = 1500) -> bytes:
    grams = protocol.encode(PARTIAL, 2, WIRE_FP16, TAG, body, KEY, mtu)
    assert all(len(g) + protocol.IP_UDP_OVERHEAD <= mtu for g in grams)
    r = Reassembler()
    out = None
    for g in reversed(grams):  # out of order
        frag = protocol.decode(g, KEY)
        assert frag.tag == TAG and frag.sender == 2 and frag.kind == PARTIAL
        got = r.add(frag)
        if got is not None:
            out = got
    assert out is not None
    return out


def test_fragmentation_roundtrip():
    for size in (0, 1, 1000, 1420, 5000, 288_000):
        body = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert _roundtrip(body) == body
    assert len(protocol.encode(ACTIVATION, 0, 0, TAG, b"x" * 5000, KEY, 1500)) == 4


def test_forged_truncated_oversized_and_replayed_are_rejected():
    good = protocol.encode(ACTIVATION, 0, WIRE_FP16, TAG, b"a" * 3000, KEY)
    with pytest.raises(ProtocolError) as e:
        protocol.decode(good[0], b"x" * 32)  # another key
    assert e.value.reason == "unauthenticated"
    tampered = bytearray(good[0])
    tampered[30] ^= 1
    with pytest.raises(ProtocolError, match="unauthenticated"):
        protocol.decode(bytes(tampered), KEY)
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.decode(good[0][:20], KEY)
    # a correctly signed header claiming an absurd body is refused before any allocation
    head = protocol.HEADER.pack(b"HL", 1, ACTIVATION, 0, 1, 7, 1, 3, 42, 1, 5, 1, 0, 0, 2,
                                protocol.MAX_BODY + 1)
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.decode(head + protocol.mac(KEY, head), KEY)
    # replay: the same fragment twice is a duplicate
    r = Reassembler()
    r.add(protocol.decode(good[0], KEY))
    with pytest.raises(ProtocolError, match="duplicate"):
        r.add(protocol.decode(good[0], KEY))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_only_raise_protocol_error(data):
    with pytest.raises(ProtocolError):
        protocol.decode(data, KEY)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=protocol.HEADER.size, max_size=600), st.integers(0, 3))
def test_fuzz_signed_garbage_never_crashes(data, n):
    """Even a peer holding the key cannot crash the parser or the reassembler."""
    signed = data + protocol.mac(KEY, data)
    r = Reassembler(max_pending=4)
    try:
        frag = protocol.decode(signed, KEY)
    except ProtocolError:
        return
    for _ in range(n + 1):
        try:
            body = r.add(frag)
        except ProtocolError:
            continue
        if body is not None:
            assert len(body) == frag.body_len


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 3), st.integers(1, 4), st.integers(1, 64))
def test_fuzz_bodies_only_raise_protocol_error(body, wire, ntok, dim):
    try:
        groups, x = decode_body(body, wire, ntok, dim)
    except ProtocolError:
        return
    assert x.shape == (ntok, dim) and torch.isfinite(x).all()


@pytest.mark.parametrize("wire,tol", [(WIRE_FP32, 0), (WIRE_FP16, 1e-3), (WIRE_BF16, 1e-2),
                                      (WIRE_INT8, 2e-2)])
def test_tensor_codec_roundtrip(wire, tol):
    x = torch.randn(3, 576) * 4
    groups, y = decode_body(encode_body(x, wire, (1, 5, 9)), wire, 3, 576)
    assert groups == (1, 5, 9)
    rel = ((y - x).abs().max() / x.abs().max()).item()
    assert rel <= tol
    with pytest.raises(ProtocolError):
        decode_body(encode_body(x, wire), wire, 2, 576)  # wrong shape
    bad = encode_body(torch.full((1, 4), float("nan")), WIRE_FP32)
    with pytest.raises(ProtocolError, match="non-finite"):
        decode_body(bad, WIRE_FP32, 1, 4)


def test_udp_endpoint_counts_and_survives_hostile_datagrams():
    ep = UdpEndpoint("127.0.0.1", 0, KEY)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", ep.port)
    good = protocol.encode(PARTIAL, 1, WIRE_FP16, TAG, b"z" * 2000, KEY)
    raw.sendto(b"\x00" * 10, addr)  # truncated
    raw.sendto(protocol.encode(PARTIAL, 1, 1, TAG, b"q", b"w" * 32)[0], addr)  # forged
    raw.sendto(good[0], addr)
    raw.sendto(good[0], addr)  # replayed
    raw.sendto(good[1], addr)
    raw.sendto(b"HL" + b"\xff" * 60, addr)  # garbage with the magic
    time.sleep(0.2)
    msgs = ep.receive()
    assert len(msgs) == 1 and msgs[0].body == b"z" * 2000 and msgs[0].tag == TAG
    c = ep.counters
    assert c["malformed"] >= 1 and c["unauthenticated"] >= 2 and c["duplicate"] == 1
    assert c["datagrams_received"] == 6
    raw.close()
    ep.close()


def test_header_layout_is_stable():
    assert protocol.HEADER.size == 36
    assert struct.calcsize(">2sBBBBIIIIHHBBHHI") == 36
