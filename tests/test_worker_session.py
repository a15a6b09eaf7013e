"""Which cached positions a worker knows: the mask it attends with and the repairs it asks."""

from __future__ import annotations

import torch

from halollm.runtime.worker_session import Session


def _session() -> Session:
    return Session(session=1, identity=b"c", udp_addr=("127.0.0.1", 1), link=None)  # type: ignore[arg-type]


def test_a_missed_position_is_masked_and_asked_for_once_until_repaired() -> None:
    s = _session()
    s.start_request(7)
    for pos in range(4):  # positions 0..3 computed in order
        assert s.key_mask(0, pos, 1) == (None, [])
        s.mark_known(0, pos, 1)
    # position 4 was lost on the way; 5 arrives
    mask, new = s.key_mask(0, 5, 1)
    assert new == [4] and mask is not None
    assert mask[:6].tolist() == [True, True, True, True, False, True]
    s.mark_known(0, 5, 1)
    mask, new = s.key_mask(0, 6, 1)  # still missing, not asked again
    assert new == [] and mask is not None and not bool(mask[4])
    s.mark_known(0, 6, 1)
    s.mark_known(0, 4, 1)  # the repair arrives
    assert s.key_mask(0, 7, 1) == (None, [])
    assert s.prefix[0] == 7  # learned from the full check, so the next token needs no tensor op
    s.mark_known(0, 7, 2)
    assert s.prefix[0] == 9 and s.key_mask(0, 9, 1) == (None, [])
    assert s.key_mask(1, 9, 1)[1] == list(range(9))  # another layer knows nothing yet


def test_a_new_request_or_a_new_shard_forgets_what_was_known() -> None:
    s = _session()
    s.start_request(1)
    s.mark_known(0, 0, 5)
    s.mark_known(1, 0, 5)
    s.forget(0)
    mask, new = s.key_mask(0, 5, 1)
    assert new == [0, 1, 2, 3, 4] and mask is not None and not bool(mask[:5].any())
    assert s.key_mask(1, 5, 1) == (None, [])
    s.start_request(2)
    assert s.key_mask(1, 5, 1)[1] == [0, 1, 2, 3, 4]
    assert isinstance(s.known_upto(1, 3), torch.Tensor)
