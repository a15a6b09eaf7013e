"""The pure decision of what a synchronisation round does next with what is pending."""

from __future__ import annotations

from halollm.runtime.round_decision import (
    MAX_RETRY_S,
    MAX_WAIT_S,
    Act,
    RoundState,
    decide,
    next_retry_interval,
)


def state(**kw) -> RoundState:
    base = dict(now=1.0, deadline=2.0, pending=frozenset({1, 2}), critical=None,
                silent=frozenset(), relaxed=True, recomputable=True, next_retry=2.0)
    return RoundState(**{**base, **kw})


def test_nothing_pending_is_done():
    assert decide(state(pending=frozenset())).act is Act.DONE


def test_before_the_deadline_it_waits_at_most_until_the_deadline():
    d = decide(state(now=1.99))
    assert d.act is Act.WAIT and abs(d.timeout - 0.01) < 1e-9
    assert decide(state(now=0.0)).timeout == MAX_WAIT_S


def test_at_the_deadline_it_classifies_once():
    assert decide(state(now=2.0)).act is Act.CLASSIFY
    assert decide(state(now=2.0, critical=frozenset({1}))).act is not Act.CLASSIFY


def test_nothing_critical_pending_gives_up_on_the_rest():
    d = decide(state(now=2.5, critical=frozenset({3})))
    assert d.act is Act.GIVE_UP and d.devices == {1, 2}


def test_relaxed_mlp_recomputes_only_the_critical_ones():
    d = decide(state(now=2.5, critical=frozenset({2, 3})))
    assert d.act is Act.RECOMPUTE and d.devices == {2}


def test_attention_retries_then_waits_for_the_retry():
    s = state(now=2.5, critical=frozenset({1}), recomputable=False, next_retry=2.2)
    d = decide(s)
    assert d.act is Act.RETRY and d.devices == {1}
    d = decide(state(now=2.5, critical=frozenset({1}), recomputable=False, next_retry=2.53))
    assert d.act is Act.WAIT and abs(d.timeout - 0.03) < 1e-9


def test_a_silent_critical_worker_ends_the_round_for_a_takeover():
    d = decide(state(now=3.0, critical=frozenset({1, 2}), recomputable=False,
                     silent=frozenset({2})))
    assert d.act is Act.WORKER_LOST and d.devices == {2}
    # silence of a worker whose contribution does not matter changes nothing
    d = decide(state(now=3.0, critical=frozenset({1}), recomputable=False, silent=frozenset({2}),
                     next_retry=9.0))
    assert d.act is Act.WAIT


def test_strict_never_retries_or_recomputes_it_waits():
    d = decide(state(now=3.0, critical=frozenset({1, 2}), relaxed=False, next_retry=0.0))
    assert d.act is Act.WAIT and d.timeout == MAX_WAIT_S
    d = decide(state(now=3.0, critical=frozenset({1, 2}), relaxed=False,
                     silent=frozenset({1})))
    assert d.act is Act.WORKER_LOST and d.devices == {1}


def test_retry_interval_doubles_up_to_its_cap():
    assert next_retry_interval(0.001) == 0.002
    assert next_retry_interval(0.04) == MAX_RETRY_S
