"""The control plane's typed messages: round trips, and refusal of anything forged, replayed,
unknown or malformed (pure; no sockets)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halollm.runtime.channel import Channel, channel_pair
from halollm.runtime.messages import (
    IN_CLEAR,
    MESSAGES,
    SEALED,
    Challenge,
    Heartbeat,
    Hello,
    Join,
    Kv,
    Need,
    Plan,
    Ready,
    Refused,
    Welcome,
    decode,
    encode,
    encode_clear,
)
from halollm.runtime.protocol import ProtocolError

KEY = b"k" * 32
SAMPLES = [
    Hello(2, 7, "ab12"),
    Challenge(2, 7, "cd34", "ef56"),
    Join(7, "hash", ["10.0.0.1", 7000]),
    Plan(7, 2, 1, "fp16", 1, 3, '[{"attn": {"groups": [], "units": []}}]'),
    Kv(7, 3, 5, 10, 2, False, b"\x00" * 32),
    Welcome(7, "hash", None, 1, 12.5, 1 << 30, 60.0),
    Refused("wrong cluster key"),
    Ready(7, 2, error=None, build_ms=1.5),
    Heartbeat(7, {"rounds": 3, "datagrams": {"stale": 1}}),
    Need(7, 3, 4, [1, 2, 9]),
]


def _pair() -> tuple[Channel, Channel]:
    return channel_pair(KEY)


def _sealed(send: Channel, head: dict, *blobs: bytes) -> list[bytes]:
    """Frames sealed properly around any header and parts (a key holder's message)."""
    n = send.next_counter()
    prefix = SEALED + struct.pack(">Q", n)
    parts = [json.dumps(head).encode(), *blobs]
    plain = b"".join(struct.pack(">Q", len(p)) + p for p in parts)
    return [prefix, send.seal(n, prefix, plain)]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.kind)
def test_every_message_round_trips_sealed(msg):
    send, recv = _pair()
    assert decode(encode(send, msg), recv) == msg


@pytest.mark.parametrize("msg", [m for m in SAMPLES if m.kind in IN_CLEAR], ids=lambda m: m.kind)
def test_join_phase_messages_round_trip_in_clear(msg):
    assert decode(encode_clear(msg), None) == msg


def test_only_the_join_phase_travels_in_clear():
    with pytest.raises(ValueError):
        encode_clear(Plan(7, 2, 1, "fp16", 1, 3, "[]"))
    forged = [b"HJ" + json.dumps({"kind": "bye", "session": 7}).encode()]
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode(forged, None)


def test_every_kind_has_a_sample():
    assert {m.kind for m in SAMPLES} | {"ping", "pong", "bye"} == set(MESSAGES)


def test_contents_travel_encrypted():
    send, _ = _pair()
    frames = encode(send, Kv(7, 3, 5, 10, 2, True, b"secret activations" * 4))
    assert len(frames) == 2
    assert all(b"secret" not in f and b"kv" not in f for f in frames)


def test_forged_replayed_and_truncated_messages_are_refused():
    send, recv = _pair()
    frames = encode(send, Need(7, 3, 4, [1]))
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode(frames, channel_pair(b"y" * 32)[1])
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode(frames, None)  # sealed, but no session with its sender
    assert decode(frames, recv) == Need(7, 3, 4, [1])
    with pytest.raises(ProtocolError, match="replayed"):
        decode(frames, recv)
    with pytest.raises(ProtocolError, match="malformed"):
        decode([b"only"], recv)
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode([frames[0], frames[1][:-1] + bytes([frames[1][-1] ^ 1])],
               _pair()[1])


@pytest.mark.parametrize("head, blobs, reason", [
    ({"kind": "teleport", "session": 1}, (), "unknown_kind"),
    ({"session": 1}, (), "unknown_kind"),
    ({"kind": "need", "session": 1, "request": 1, "layer": 2}, (), "malformed"),  # missing
    ({"kind": "need", "session": 1, "request": 1, "layer": "2", "positions": []}, (),
     "malformed"),  # wrong type
    ({"kind": "need", "session": 1, "request": 1, "layer": 2, "positions": ["a"]}, (),
     "malformed"),  # wrong item type
    ({"kind": "need", "session": True, "request": 1, "layer": 2, "positions": []}, (),
     "malformed"),  # a bool is not an int
    ({"kind": "bye", "session": 1, "extra": 1}, (), "malformed"),  # unknown field
    ({"kind": "kv", "session": 1, "request": 1, "layer": 0, "start": 0, "n": 1,
      "replay": False}, (), "malformed"),  # its blob is missing
    ({"kind": "bye", "session": 1}, (b"blob",), "malformed"),  # a blob too many
])
def test_malformed_but_authentic_messages_are_refused(head, blobs, reason):
    send, recv = _pair()
    with pytest.raises(ProtocolError) as err:
        decode(_sealed(send, head, *blobs), recv)
    assert err.value.reason == reason


def test_non_json_and_non_object_headers_are_refused():
    for raw in (b"\xff\xfe", b"[1, 2]", b"null"):
        with pytest.raises(ProtocolError, match="malformed"):
            decode([b"HJ" + raw], None)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_frames_raise_only_protocol_errors(frames):
    try:
        decode(frames, _pair()[1])
    except ProtocolError:
        pass


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["kind", "session", "request", "layer", "positions",
                                        "t", "reason", "stats", "epoch", "nonce", "salt"]),
                       st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans(),
                                 st.lists(st.integers(), max_size=3),
                                 st.sampled_from(list(MESSAGES)))),
       st.binary(max_size=40))
def test_authentic_random_headers_and_parts_raise_only_protocol_errors(head, tail):
    send, recv = _pair()
    frames = _sealed(send, head)
    try:
        msg = decode(frames, recv)
    except ProtocolError:
        pass
    else:
        assert msg.kind == head["kind"]
    n = send.next_counter()  # sealed bytes that are no valid part list at all
    prefix = SEALED + struct.pack(">Q", n)
    try:
        decode([prefix, send.seal(n, prefix, tail)], recv)
    except ProtocolError:
        pass
