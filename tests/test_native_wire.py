"""The native data path (`runtime/_wire.c`) against the Python reference (`protocol.py`): the
same datagrams byte for byte, each end accepting the other's, and hostile input rejected and
counted alike. Where OpenSSL's headers are (as in CI) it must have been built."""

from __future__ import annotations

import importlib.util
import socket
import time
from pathlib import Path

import pytest

from halollm.runtime import protocol
from halollm.runtime.channel import channel_pair
from halollm.runtime.protocol import ACTIVATION, PARTIAL, RoundTag
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
