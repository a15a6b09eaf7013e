"""The native data path (`runtime/_wire.c`) against the Python reference (`protocol.py`): the
same datagrams byte for byte, each end accepting the other's, and hostile input rejected and
counted alike. Where OpenSSL's headers are (as in CI) it must have been built."""

from __future__ import annotations

import importlib.util
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from halollm.runtime import protocol
from halollm.runtime.channel import ReplayWindow, channel_pair
from halollm.runtime.protocol import ACTIVATION, PARTIAL, RoundTag
from halollm.runtime.tensor_codec import (
    WIRE_BF16,
    WIRE_FP16,
    WIRE_FP32,
    WIRE_INT8,
    check_body,
    decode_body,
    encode_body,
    place_bodies,
)
from halollm.runtime.transport import NATIVE, UdpEndpoint

KEY = b"n" * 32
TAG = RoundTag(session=9, epoch=2, request=1, pos=17, ntok=1, layer=3, phase=1)
PATHS = [pytest.param("python", id="python"), pytest.param("native", id="native")]


def test_the_native_path_is_built_where_openssl_is() -> None:
    if Path("/usr/include/openssl/evp.h").exists():
        assert importlib.util.find_spec("halollm.runtime._wire") is not None, \
            "runtime/_wire.c did not build (see setup.py)"


def _path(name: str) -> object | None:
    """The `native` argument of an endpoint on that path; the native one skips, saying so,
    where it is not built (where OpenSSL's headers are, the test above fails instead)."""
    if name == "python":
        return None
    if NATIVE is None:
        pytest.skip("the native data path is off: not built here (no C compiler or OpenSSL "
                    "headers) or HALO_PURE_PYTHON is set")
    return NATIVE


def _drain(rx: UdpEndpoint, want: int) -> list[protocol.Fragment | bytes]:
    out = []
    end = time.monotonic() + 2.0
    while len(out) < want and time.monotonic() < end:
        if rx.readable(0.1):
            out.extend(rx.receive())
    return out


@pytest.mark.parametrize("mtu", [1500, 600])
def test_native_sends_the_datagrams_the_python_path_would(mtu: int) -> None:
    native = _path("native")
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.settimeout(2.0)
    addr = raw.getsockname()
    body = bytes(range(256)) * 13  # 3328 bytes: several fragments
    coordinator, _ = channel_pair(KEY)
    twin, _ = channel_pair(KEY)
    for _ in range(5):  # both ends' counters already advanced
        coordinator.next_counter()
        twin.next_counter()
    tx = UdpEndpoint("127.0.0.1", 0, lambda s, n: None, mtu=mtu, native=native)
    tx.send(ACTIVATION, 0, 2, TAG, body, [(addr, coordinator), (addr, coordinator)])
    expected = protocol.encode(ACTIVATION, 0, 2, TAG, body, twin, mtu)
    expected += protocol.encode(ACTIVATION, 0, 2, TAG, body, twin, mtu)
    got = [raw.recv(65536) for _ in expected]
    assert got == expected and coordinator.sent == twin.sent
    assert tx.counters["datagrams_sent"] == len(expected)
    tx.close()
    raw.close()


@pytest.mark.parametrize("sender_path", PATHS)
@pytest.mark.parametrize("receiver_path", PATHS)
def test_either_end_reads_the_other(sender_path: str, receiver_path: str) -> None:
    sender_native, receiver_native = _path(sender_path), _path(receiver_path)
    coordinator, worker = channel_pair(KEY)
    rx = UdpEndpoint("127.0.0.1", 0, lambda s, n: coordinator if (s, n) == (4, 9) else None,
                     mtu=1500, native=receiver_native)
    tx = UdpEndpoint("127.0.0.1", 0, lambda s, n: None, mtu=1500, native=sender_native)
    bodies = [bytes([i]) * n for i, n in enumerate((0, 1, 1400, 5000))]
    for body in bodies:
        tx.send(PARTIAL, 4, 1, TAG, body, [(("127.0.0.1", rx.port), worker)])
    msgs = _drain(rx, len(bodies))
    assert sorted(m.body for m in msgs) == sorted(bodies)
    assert all(m.tag == TAG and m.sender == 4 and m.kind == PARTIAL and m.wire == 1
               and m.addr == tx.sock.getsockname() for m in msgs)
    tx.close()
    rx.close()


@pytest.mark.parametrize("path", PATHS)
def test_hostile_datagrams_are_rejected_and_counted_alike(path: str) -> None:
    native = _path(path)
    coordinator, worker = channel_pair(KEY)
    rx = UdpEndpoint("127.0.0.1", 0, lambda s, n: coordinator if s == 1 else None,
                     native=native)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", rx.port)
    good = protocol.encode(PARTIAL, 1, 1, TAG, b"z" * 2000, worker)
    stranger = channel_pair(b"s" * 32)[1]
    bad_phase = bytearray(protocol.encode(PARTIAL, 1, 1, TAG, b"q", worker)[0])
    bad_phase[26] = 99  # a phase that does not exist (before the seal is checked)
    for data in (b"\x00" * 10,  # truncated
                 protocol.encode(PARTIAL, 1, 1, TAG, b"q", stranger)[0],  # forged
                 protocol.encode(PARTIAL, 5, 1, TAG, b"q", worker)[0],  # not a peer
                 good[0], good[0],  # the second is a replay
                 good[1],
                 bytes(bad_phase),
                 b"HL\x03" + b"\xff" * 60):  # garbage with the magic and version
        raw.sendto(data, addr)
    time.sleep(0.2)
    msgs = rx.receive()
    assert [m.body for m in msgs] == [b"z" * 2000]
    c = rx.counters
    assert (c["malformed"], c["unauthenticated"], c["replayed"], c["unknown_sender"]) == \
        (3, 1, 1, 1), c
    assert c["datagrams_received"] == 8
    raw.close()
    rx.close()


@pytest.mark.parametrize("wire", [WIRE_FP32, WIRE_FP16, WIRE_BF16, WIRE_INT8])
def test_a_decode_rounds_partials_summed_in_c_equal_the_python_paths(wire: int) -> None:
    """`_wire.Gather` takes a decode round's partials in whole (replay window, reassembly,
    checks, the float32 sum): the sum is the bodies' own sum in arrival order, and what it
    refuses or leaves (a replay, a forgery, a non-finite body, another round's partial) is
    refused and counted as the Python path does, or handed back to it."""
    native = _path("native")
    dim = 700
    links = {s: channel_pair(bytes([s]) * 32) for s in (1, 2, 3)}
    rx = UdpEndpoint("127.0.0.1", 0,
                     lambda s, n: links[s][0] if s in links and n == TAG.session else None,
                     mtu=600, native=native)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", rx.port)
    torch.manual_seed(0)
    bodies = {s: encode_body(torch.randn(1, dim) * 2, wire, (s, 7)) for s in links}
    nan = encode_body(torch.full((1, dim), float("nan")), wire, (2,))
    other = TAG._replace(pos=TAG.pos - 1)  # an earlier round's late partial

    def datagrams(s: int, body: bytes, tag: RoundTag = TAG) -> list[bytes]:
        return protocol.encode(PARTIAL, s, wire, tag, body, links[s][1], mtu=600)

    first = datagrams(1, bodies[1])
    forged = bytearray(datagrams(3, bodies[3])[0])
    forged[-1] ^= 1
    sends = [*first, first[0],  # the last one a replay
             *datagrams(2, nan),  # refused: worker 2 stays pending
             bytes(forged), *datagrams(3, bodies[3], other), *datagrams(2, bodies[2]),
             *datagrams(3, bodies[3])]
    gather = rx.gather(TAG, [1, 2, 3], [links[s][0] for s in (1, 2, 3)], wire, dim)
    assert gather is not None and len(first) > 1  # several fragments each
    for data in sends:
        raw.sendto(data, addr)
    time.sleep(0.2)
    late = rx.receive(gather=gather)
    arrived = [s for s, _ in gather.arrived()]
    assert arrived == [1, 2, 3]
    expected = torch.zeros(1, dim)
    for s in arrived:
        expected = expected + decode_body(bodies[s], wire, 1, dim)[1].float()
    total = torch.frombuffer(gather.total(), dtype=torch.float32).view(1, dim)
    assert torch.equal(total, expected)
    assert [(m.sender, m.tag, m.body) for m in late] == [(3, other, bodies[3])]
    c = rx.counters
    assert (c["replayed"], c["malformed"], c["unauthenticated"]) == (1, 1, 1), c
    assert c["datagrams_received"] == len(sends)
    gather.drop(3)  # no longer waited for: its answer now is late, the Python path's
    raw.sendto(datagrams(3, bodies[3])[0], addr)
    time.sleep(0.1)
    assert rx.receive(gather=gather) == [] and gather.arrived() == []
    raw.close()
    rx.close()


@pytest.mark.parametrize("wire", [WIRE_FP32, WIRE_BF16, WIRE_INT8])
def test_a_gather_with_spans_places_each_partial_at_its_own_rows(wire: int) -> None:
    """With spans (the LM head split by rows), each worker's partial is checked against its
    own length and placed at its offset: the output is the rows side by side, bitwise the
    Python path's placement (`tensor_codec.place_bodies`); a body of the wrong length for its
    sender is refused as malformed and leaves it pending."""
    native = _path("native")
    links = {s: channel_pair(bytes([s]) * 32) for s in (1, 2, 3)}
    spans = {1: (0, 1000), 2: (1000, 999), 3: (1999, 1001)}
    vocab = 3000
    tag = TAG._replace(layer=0, phase=protocol.HEAD)
    rx = UdpEndpoint("127.0.0.1", 0,
                     lambda s, n: links[s][0] if s in links and n == TAG.session else None,
                     mtu=1500, native=native)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    torch.manual_seed(1)
    bodies = {s: encode_body(torch.randn(1, n) * 3, wire) for s, (_, n) in spans.items()}
    wrong = encode_body(torch.randn(1, 1100), wire)  # worker 2's rows are 999

    def datagrams(s: int, body: bytes) -> list[bytes]:
        return protocol.encode(PARTIAL, s, wire, tag, body, links[s][1], mtu=1500)

    gather = rx.gather(tag, [1, 2, 3], [links[s][0] for s in (1, 2, 3)], wire, vocab,
                       [spans[s] for s in (1, 2, 3)])
    for data in [*datagrams(3, bodies[3]), *datagrams(2, wrong), *datagrams(1, bodies[1]),
                 *datagrams(2, bodies[2])]:
        raw.sendto(data, ("127.0.0.1", rx.port))
    time.sleep(0.2)
    assert rx.receive(gather=gather) == []
    assert sorted(s for s, _ in gather.arrived()) == [1, 2, 3]
    assert rx.counters["malformed"] == 1
    total = torch.frombuffer(gather.total(), dtype=torch.float32).view(1, vocab)
    expected = place_bodies([(bodies[s], check_body(bodies[s], wire, 1, n), first, n)
                             for s, (first, n) in spans.items()], wire, vocab)
    assert torch.equal(total, expected)
    for s, (first, n) in spans.items():  # each worker's values at its rows
        assert torch.equal(total[:, first:first + n], decode_body(bodies[s], wire, 1, n)[1]
                           .float())
    raw.close()
    rx.close()


def test_a_gather_waits_in_c_until_its_partials_are_in_or_something_else_comes() -> None:
    """`receive(gather=, timeout=)` waits in C: it returns when every worker's partial is
    in (sent from another thread while it waits, so the wait lets that thread run), at once
    when another round's message comes for the Python path, and after the timeout when
    nothing comes; the time it slept is counted."""
    native = _path("native")
    dim, wire = 64, WIRE_FP32
    links = {s: channel_pair(bytes([s]) * 32) for s in (1, 2)}
    rx = UdpEndpoint("127.0.0.1", 0,
                     lambda s, n: links[s][0] if s in links and n == TAG.session else None,
                     native=native)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", rx.port)

    def send(s: int, tag: RoundTag, delay: float) -> threading.Thread:
        body = encode_body(torch.full((1, dim), float(s)), wire)

        def run() -> None:
            time.sleep(delay)
            for data in protocol.encode(PARTIAL, s, wire, tag, body, links[s][1], mtu=1500):
                raw.sendto(data, addr)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    gather = rx.gather(TAG, [1, 2], [links[s][0] for s in (1, 2)], wire, dim)
    threads = [send(1, TAG, 0.05), send(2, TAG, 0.15)]
    t0 = time.monotonic()
    assert rx.receive(gather=gather, timeout=5.0) == []
    waited = time.monotonic() - t0
    assert [s for s, _ in gather.arrived()] == [1, 2] and waited < 4.0
    assert 0.1 <= rx.slept_s <= waited
    total = torch.frombuffer(gather.total(), dtype=torch.float32)
    assert torch.equal(total, torch.full((dim,), 3.0))
    other = TAG._replace(pos=TAG.pos + 1)
    gather = rx.gather(other, [1, 2], [links[s][0] for s in (1, 2)], wire, dim)
    threads.append(send(1, TAG, 0.05))  # the earlier round's: a late partial, handed back
    t0 = time.monotonic()
    late = rx.receive(gather=gather, timeout=5.0)
    assert [(m.sender, m.tag) for m in late] == [(1, TAG)] and time.monotonic() - t0 < 4.0
    t0, slept = time.monotonic(), rx.slept_s
    assert rx.receive(gather=gather, timeout=0.2) == [] and gather.arrived() == []
    assert time.monotonic() - t0 >= 0.2 and rx.slept_s - slept >= 0.15
    for thread in threads:
        thread.join()
    assert rx.wakeups >= 3  # each partial woke it (and the late one)
    woken = rx.wakeups
    # coalescing: after the first wake-up it pauses while more than one partial is to
    # come, so partials 2 and 3 (10 and 20 ms after 1) are read on fewer wake-ups
    links[3] = channel_pair(bytes([3]) * 32)
    rx.coalesce_s = 0.05
    tag = TAG._replace(pos=TAG.pos + 2)
    gather = rx.gather(tag, [1, 2, 3], [links[s][0] for s in (1, 2, 3)], wire, dim)
    threads = [send(1, tag, 0.05), send(2, tag, 0.06), send(3, tag, 0.07)]
    assert rx.receive(gather=gather, timeout=5.0) == []
    assert sorted(s for s, _ in gather.arrived()) == [1, 2, 3]
    assert rx.wakeups - woken <= 2
    for thread in threads:
        thread.join()
    raw.close()
    rx.close()


def test_the_native_replay_window_keeps_the_python_windows_rules() -> None:
    _path("native")
    rng = random.Random(5)
    for size in (1, 63, 64, 65, 1000, 1024):
        ref, win = ReplayWindow(size), NATIVE.Window(size)  # type: ignore[attr-defined]
        high = 0
        for _ in range(2000):
            c = rng.choice([rng.randint(0, high + 3), high + rng.randint(1, 2 * size + 3),
                            max(0, high - rng.randint(0, size + 2))])
            assert win.fresh(c) == ref.fresh(c), (size, c)
            if ref.fresh(c) is None and c > 0 and rng.random() < 0.8:
                ref.accept(c)
                win.accept(c)
                high = max(high, c)
            assert win.highest == ref.highest


def _decoded(body: bytes, wire: int, ntok: int, dim: int, native: object | None
             ) -> tuple[tuple[int, ...], torch.Tensor] | str:
    try:
        return decode_body(body, wire, ntok, dim, native=native)
    except protocol.ProtocolError as exc:
        return exc.reason


@pytest.mark.parametrize("wire", [WIRE_FP32, WIRE_FP16, WIRE_BF16, WIRE_INT8])
def test_native_body_decoding_gives_the_python_paths_values_and_refusals(wire: int) -> None:
    """What a worker does with every activation: the values bitwise, the same bodies refused
    (wrong length, non-finite values or scales, corrupted bytes), across shapes and groups."""
    native = _path("native")
    rng = random.Random(wire)
    for trial in range(300):
        ntok, dim = rng.choice([1, 1, 2, 5]), rng.choice([1, 31, 32, 33, 70, 576, 1024])
        x = torch.randn(ntok, dim) * rng.choice([1e-3, 1.0, 50.0])
        if trial % 7 == 1:
            x[rng.randrange(ntok), rng.randrange(dim)] = rng.choice(
                [float("nan"), float("inf"), -float("inf")])
        groups = tuple(rng.randrange(1 << 16) for _ in range(rng.randrange(4)))
        body = bytearray(encode_body(x, wire, groups))
        if trial % 5 == 2:  # bytes corrupted anywhere, or a body cut short or grown
            for _ in range(rng.randint(1, 6)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        if trial % 11 == 3:
            body = body[:rng.randrange(len(body))] if rng.random() < 0.5 else body + b"\0\0"
        ref, got = (_decoded(bytes(body), wire, ntok, dim, n) for n in (None, native))
        if isinstance(ref, str):
            assert got == ref == "malformed", trial
            continue
        assert not isinstance(got, str), (trial, got)
        assert got[0] == ref[0] and got[1].dtype == ref[1].dtype, trial
        assert torch.equal(got[1].view(torch.uint8), ref[1].view(torch.uint8)), trial
    assert _decoded(encode_body(torch.ones(1, 8), wire), 9, 1, 8, native) == "malformed"
