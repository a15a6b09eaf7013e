"""The link's crypto: the replay window (against a plain reference), sealing and opening,
the key stretching and the derived link keys (pure, fast)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halollm.errors import ProtocolError
from halollm.runtime.channel import ReplayWindow, channel_pair
from halollm.runtime.keys import cluster_key, link_keys


def _reference(size: int, counters: list[int]) -> list[str | None]:
    """What a window must say of each counter: accepted once, never at or below
    highest - size, never 0."""
    seen: set[int] = set()
    highest = 0
    out = []
    for c in counters:
        if c <= 0 or c <= highest - size:
            out.append("too_old")
        elif c in seen:
            out.append("replayed")
        else:
            out.append(None)
            seen.add(c)
            highest = max(highest, c)
    return out


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 70), st.lists(st.integers(0, 300), max_size=200))
def test_replay_window_matches_the_reference(size, counters):
    w = ReplayWindow(size)
    got = []
    for c in counters:
        why = w.fresh(c)
        if why is None:
            w.accept(c)
        got.append(why)
    assert got == _reference(size, counters)


def test_replay_window_after_a_long_jump_forgets_everything_behind():
    w = ReplayWindow(64)
    for c in range(1, 50):
        w.accept(c)
    w.accept(10_000)
    assert w.fresh(49) == "too_old" and w.fresh(9_999) is None and w.fresh(10_000) == "replayed"


def test_sealed_units_open_once_and_only_with_the_right_key_and_direction():
    coordinator, worker = channel_pair(b"k" * 32)
    n = coordinator.next_counter()
    sealed = coordinator.seal(n, b"aad", b"hello")
    assert b"hello" not in sealed
    with pytest.raises(ProtocolError, match="unauthenticated"):
        coordinator.open(n, b"aad", sealed)  # the sender's own direction: not the peer's
    with pytest.raises(ProtocolError, match="unauthenticated"):
        worker.open(n, b"other aad", sealed)
    assert worker.open(n, b"aad", sealed) == b"hello"
    with pytest.raises(ProtocolError, match="replayed"):
        worker.open(n, b"aad", sealed)
    other = channel_pair(b"j" * 32)[1]
    n2 = coordinator.next_counter()
    with pytest.raises(ProtocolError, match="unauthenticated"):
        other.open(n2, b"aad", coordinator.seal(n2, b"aad", b"x"))


def test_stretching_is_salted_and_link_keys_depend_on_both_nonces():
    key = cluster_key("a short key")
    a, b = key.stretched(b"s" * 16), key.stretched(b"t" * 16)
    assert a != b and len(a) == 32 and a == cluster_key("a short key").stretched(b"s" * 16)
    assert "short" not in repr(key)
    base = link_keys(a, b"c" * 16, b"w" * 16)
    assert base.data != base.control
    assert link_keys(a, b"c" * 16, b"v" * 16).data != base.data
    assert link_keys(a, b"d" * 16, b"w" * 16).control != base.control
    with pytest.raises(ValueError):
        cluster_key("")
