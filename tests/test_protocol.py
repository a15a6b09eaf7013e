"""The data-plane codec and control-message format: round trips, and hostile input."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from halollm.runtime import protocol
from halollm.runtime.channel import Channel, channel_pair
from halollm.runtime.protocol import ACTIVATION, PARTIAL, ProtocolError, Reassembler, RoundTag
from halollm.runtime.tensor_codec import (
    WIRE_BF16,
    WIRE_FP16,
    WIRE_FP32,
    WIRE_INT8,
    check_body,
    decode_body,
    encode_body,
    sum_bodies,
)
from halollm.runtime.transport import UdpEndpoint, path_mtu

KEY = b"k" * 32
TAG = RoundTag(session=7, epoch=1, request=3, pos=42, ntok=1, layer=5, phase=1)


def _link(key: bytes = KEY) -> tuple[Channel, Channel]:
    """(the sending worker's end, the receiving coordinator's end) of one link."""
    coordinator, worker = channel_pair(key)
    return worker, coordinator


def _roundtrip(body: bytes, mtu: int = 1500) -> bytes:
    send, recv = _link()
    grams = protocol.encode(PARTIAL, 2, WIRE_FP16, TAG, body, send, mtu)
    assert all(len(g) + protocol.IP_UDP_OVERHEAD <= mtu for g in grams)
    r = Reassembler()
    out = None
    for g in reversed(grams):  # out of order
        frag = protocol.decode(g, lambda sender, session: recv)
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
    assert len(protocol.encode(ACTIVATION, 0, 0, TAG, b"x" * 5000, _link()[0], 1500)) == 4


def test_the_body_travels_encrypted():
    body = b"the prompt's activations " * 40
    gram = protocol.encode(PARTIAL, 1, WIRE_FP16, TAG, body, _link()[0])[0]
    assert b"prompt" not in gram and body[:64] not in gram


def test_forged_truncated_oversized_replayed_and_misrouted_are_rejected():
    send, recv = _link()
    good = protocol.encode(ACTIVATION, 0, WIRE_FP16, TAG, b"a" * 3000, send)
    other = _link(b"x" * 32)[1]
    with pytest.raises(ProtocolError) as e:
        protocol.decode(good[0], lambda s, n: other)  # another key
    assert e.value.reason == "unauthenticated"
    tampered = bytearray(good[0])
    tampered[30] ^= 1  # in the header: the authenticated data
    with pytest.raises(ProtocolError, match="unauthenticated"):
        protocol.decode(bytes(tampered), lambda s, n: recv)
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.decode(good[0][:20], lambda s, n: recv)
    with pytest.raises(ProtocolError, match="unknown_sender"):
        protocol.decode(good[0], lambda s, n: None)
    # a header claiming an absurd body is refused before any crypto or allocation
    head = protocol.HEADER.pack(b"HL", protocol.VERSION, ACTIVATION, 0, 1, 7, 1, 3, 42, 1, 5,
                                1, 0, 0, 2, protocol.MAX_BODY + 1, 1)
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.decode(head + b"\0" * 32, lambda s, n: recv)
    # replay: the same datagram twice is rejected by the window, before reassembly
    protocol.decode(good[0], lambda s, n: recv)
    with pytest.raises(ProtocolError, match="replayed"):
        protocol.decode(good[0], lambda s, n: recv)
    protocol.decode(good[1], lambda s, n: recv)  # its sibling is still fine


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_only_raise_protocol_error(data):
    recv = _link()[1]
    with pytest.raises(ProtocolError):
        protocol.decode(data, lambda s, n: recv)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 3), st.integers(0, 2**16))
def test_fuzz_sealed_garbage_never_crashes(data, n, count):
    """Even a peer holding the key cannot crash the parser or the reassembler: any header
    (its counter included), any body, sealed properly."""
    send, recv = _link()
    if len(data) < protocol.HEADER.size:
        data = data + bytes(protocol.HEADER.size - len(data))
    head, body = data[:protocol.HEADER.size], data[protocol.HEADER.size:]
    counter = count + 1
    head = head[:-8] + struct.pack(">Q", counter)
    gram = head + send.seal(counter, head, body)
    r = Reassembler(max_pending=4)
    try:
        frag = protocol.decode(gram, lambda s, m: recv)
    except ProtocolError:
        return
    for _ in range(n + 1):
        try:
            got = r.add(frag)
        except ProtocolError:
            continue
        if got is not None:
            assert len(got) == frag.body_len


def test_reassembly_is_bounded_per_sender_and_in_bytes():
    send = _link()[0]
    r = Reassembler(max_pending=8, per_sender=3, max_bytes=10_000)
    recv = _link()[1]

    def first_fragment(sender: int, pos: int) -> protocol.Fragment:
        tag = RoundTag(7, 1, 3, pos, 1, 0, 1)
        g = protocol.encode(PARTIAL, sender, WIRE_FP16, tag, b"b" * 3000, send)[0]
        return protocol.decode(g, lambda s, n: recv)

    for pos in range(10):
        assert r.add(first_fragment(1, pos)) is None
    assert len([k for k in r._pending if k[1] == 1]) == 3  # one sender keeps at most 3
    for pos in range(10):
        r.add(first_fragment(2, pos))
    assert r.held_bytes <= 10_000 and r.dropped_incomplete >= 14
    # fragments that add up to more than the declared body: dropped
    tag = RoundTag(7, 1, 3, 99, 1, 0, 1)
    a = protocol.decode(protocol.encode(PARTIAL, 3, 1, tag, b"c" * 3000, send)[0],
                        lambda s, n: recv)
    r2 = Reassembler()
    r2.add(a)
    big = protocol.Fragment(a.kind, a.sender, a.wire, a.tag, 1, a.count, a.body_len,
                            b"d" * 2999)
    with pytest.raises(ProtocolError, match="exceed"):
        r2.add(big)


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
    for value in (float("nan"), float("inf"), -float("inf")):
        ok = torch.ones(2, 8)
        ok[1, 5] = value
        with pytest.raises(ProtocolError, match="non-finite"):
            decode_body(encode_body(ok, wire), wire, 2, 8)
    top = {WIRE_FP16: 6e4, WIRE_INT8: 8e6}.get(wire, 3e38)
    big = torch.full((1, 4), top)
    assert torch.isfinite(decode_body(encode_body(big, wire), wire, 1, 4)[1]).all()


@pytest.mark.parametrize("wire", [WIRE_FP32, WIRE_FP16, WIRE_BF16, WIRE_INT8])
@pytest.mark.parametrize("ntok", [1, 3])
def test_a_rounds_partials_summed_together_equal_the_sum_of_each_decoded(wire, ntok):
    """Rounds.gather checks each body on arrival and decodes them together at the end
    (sum_bodies): exactly the float32 sum of the bodies decoded one by one, whatever group
    lists they carry."""
    xs = [torch.randn(ntok, 70) * 3 for _ in range(4)]
    bodies = [encode_body(x, wire, g) for x, g in zip(xs, [(), (1, 2), (), (5,)], strict=True)]
    for chosen in (bodies, bodies[::2], bodies[:1]):
        ref = torch.zeros(ntok, 70)
        for b in chosen:
            ref = ref + decode_body(b, wire, ntok, 70)[1].float()
        checked = [(b, check_body(b, wire, ntok, 70)) for b in chosen]
        got = sum_bodies(checked, wire, ntok, 70)
        assert got.dtype == torch.float32 and got.shape == (ntok, 70)
        assert torch.allclose(got, ref, rtol=0, atol=1e-5)
    with pytest.raises(ProtocolError, match="non-finite"):
        check_body(encode_body(torch.full((ntok, 70), float("nan")), wire), wire, ntok, 70)


@pytest.mark.parametrize("dim", [1024, 576, 70])
def test_int8_wire_confines_an_outlier_to_its_block(dim):
    """Q8_0-style blocks: each 32 values carry their own scale, so a residual-stream outlier
    (LLM activations have a few, hundreds of times the rest) costs precision only in its
    own block; the body is about half of bf16's, so 1024 values fit one 1500-byte datagram."""
    x = torch.randn(2, dim)
    x[0, 3] = 500.0
    groups, y = decode_body(encode_body(x, WIRE_INT8, (7,)), WIRE_INT8, 2, dim)
    assert groups == (7,) and y.shape == (2, dim) and y.dtype == torch.float32
    for row in range(2):
        for b in range(0, dim, 32):
            block = x[row, b:b + 32]
            err = (y[row, b:b + 32] - block).abs().max().item()
            assert err <= block.abs().max().item() / 254 * 1.01 + 1e-6
    assert (y[1] - x[1]).abs().max().item() < 0.05  # the other row: untouched by row 0
    assert len(encode_body(torch.randn(1, 1024), WIRE_INT8)) == 2 + 32 * 34
    assert protocol.max_payload(1500) >= 2 + 32 * 34 + 4  # one datagram, with a few groups
    zeros = decode_body(encode_body(torch.zeros(1, dim), WIRE_INT8), WIRE_INT8, 1, dim)[1]
    assert not zeros.any()


def test_udp_endpoint_counts_and_survives_hostile_datagrams():
    send, recv = _link()
    ep = UdpEndpoint("127.0.0.1", 0, lambda sender, session: recv if sender == 1 else None)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", ep.port)
    good = protocol.encode(PARTIAL, 1, WIRE_FP16, TAG, b"z" * 2000, send)
    raw.sendto(b"\x00" * 10, addr)  # truncated
    raw.sendto(protocol.encode(PARTIAL, 1, 1, TAG, b"q", _link(b"w" * 32)[0])[0], addr)  # forged
    raw.sendto(protocol.encode(PARTIAL, 4, 1, TAG, b"q", send)[0], addr)  # not our peer
    raw.sendto(good[0], addr)
    raw.sendto(good[0], addr)  # replayed
    raw.sendto(good[1], addr)
    raw.sendto(b"HL" + b"\xff" * 60, addr)  # garbage with the magic
    time.sleep(0.2)
    msgs = ep.receive()
    assert len(msgs) == 1 and msgs[0].body == b"z" * 2000 and msgs[0].tag == TAG
    c = ep.counters
    assert c["malformed"] >= 1 and c["unauthenticated"] == 1 and c["replayed"] == 1
    assert c["unknown_sender"] == 1 and c["datagrams_received"] == 7
    raw.close()
    ep.close()


def test_header_layout_is_stable():
    assert protocol.HEADER.size == 44
    assert struct.calcsize(">2sBBBBIIIIHHBBHHIQ") == 44


def test_datagrams_follow_the_path_mtu():
    """Loopback's path MTU (64 KiB) carries a message in one datagram; a fixed --mtu
    fragments it; the receiver reassembles either, byte for byte."""
    send, recv = _link()
    rx = UdpEndpoint("127.0.0.1", 0, lambda sender, session: recv if sender == 2 else None)
    addr = ("127.0.0.1", rx.port)
    assert path_mtu(addr) == 65535  # loopback's 65536, capped at an IPv4 datagram's size
    body = bytes(range(256)) * 40  # 10 KiB
    for mtu, datagrams in ((None, 1), (1500, 8)):
        tx = UdpEndpoint("127.0.0.1", 0, lambda sender, session: None, mtu=mtu)
        tx.send(PARTIAL, 2, WIRE_FP16, TAG, body, [(addr, send)])
        assert tx.counters["datagrams_sent"] == datagrams
        assert rx.readable(1.0)
        time.sleep(0.05)
        msgs = rx.receive()
        assert [m.body for m in msgs] == [body] and msgs[0].addr == tx.sock.getsockname()
        tx.close()
    assert not rx.readable(0.01, spin=0.005)  # nothing waits: neither spinning nor sleeping
    rx.close()


def test_readable_spins_then_sleeps_until_a_datagram_arrives():
    rx = UdpEndpoint("127.0.0.1", 0, lambda sender, session: None)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    timer = threading.Timer(0.05, lambda: raw.sendto(b"x", ("127.0.0.1", rx.port)))
    timer.start()
    assert rx.readable(5.0, spin=0.01)  # arrives after the spin, while sleeping
    assert rx.readable(0.0, spin=0.01)  # already waiting
    timer.join()
    raw.close()
    rx.close()
