"""The control plane's typed messages: round trips, and refusal of anything forged, unknown
or malformed (pure; no sockets)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halollm.runtime.messages import (
    MESSAGES,
    Heartbeat,
    Hello,
    Kv,
    Need,
    Plan,
    Ready,
    Refused,
    Welcome,
    _mac,
    decode,
    encode,
    is_keyless_refusal,
    keyless_refusal,
)
from halollm.runtime.protocol import ProtocolError

KEY = b"k" * 32
SAMPLES = [
    Hello(1, 7, "ab12", "hash", ["10.0.0.1", 7000], "proof"),
    Plan(7, 2, 1, "fp16", 1, 3, '[{"attn": {"groups": [], "units": []}}]'),
    Kv(7, 3, 5, 10, 2, False, b"\x00" * 32),
    Welcome(7, "p", "hash", None, 1, 12.5, 1 << 30, 60.0),
    Refused("wrong cluster key"),
    Ready(7, 2, error=None, build_ms=1.5),
    Heartbeat(7, {"rounds": 3, "datagrams": {"stale": 1}}),
    Need(7, 3, 4, [1, 2, 9]),
]


def _signed(head: dict, *blobs: bytes) -> list[bytes]:
    frames = [json.dumps(head).encode(), *blobs]
    return [*frames, _mac(KEY, frames)]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.kind)
def test_every_message_round_trips(msg):
    assert decode(KEY, encode(KEY, msg)) == msg


def test_every_kind_has_a_sample():
    assert {m.kind for m in SAMPLES} | {"ping", "pong", "bye"} == set(MESSAGES)


def test_bytes_fields_travel_as_frames_not_json():
    frames = encode(KEY, Kv(7, 3, 5, 10, 2, True, b"\xff" * 8))
    assert len(frames) == 3 and frames[1] == b"\xff" * 8
    assert "x" not in json.loads(frames[0])


def test_forged_and_truncated_messages_are_refused():
    frames = encode(KEY, Need(7, 3, 4, [1]))
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode(b"y" * 32, frames)
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode(KEY, [b'{"kind":"bye","session":7}', frames[-1]])
    with pytest.raises(ProtocolError, match="malformed"):
        decode(KEY, [b"only"])


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
    with pytest.raises(ProtocolError) as err:
        decode(KEY, _signed(head, *blobs))
    assert err.value.reason == reason


def test_non_json_and_non_object_headers_are_refused():
    for raw in (b"\xff\xfe", b"[1, 2]", b"null"):
        frames = [raw, _mac(KEY, [raw])]
        with pytest.raises(ProtocolError, match="malformed"):
            decode(KEY, frames)


def test_keyless_refusal_is_recognised_and_never_decodes():
    frames = keyless_refusal("wrong cluster key")
    assert is_keyless_refusal(frames, "wrong cluster key")
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode(KEY, frames)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_frames_raise_only_protocol_errors(frames):
    try:
        decode(KEY, frames)
    except ProtocolError:
        pass


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["kind", "session", "request", "layer", "positions",
                                        "t", "reason", "stats", "epoch"]),
                       st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans(),
                                 st.lists(st.integers(), max_size=3),
                                 st.sampled_from(list(MESSAGES)))))
def test_authentic_random_headers_raise_only_protocol_errors(head):
    try:
        msg = decode(KEY, _signed(head))
    except ProtocolError:
        return
    assert msg.kind == head["kind"]
