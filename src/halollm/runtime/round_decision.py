"""What a synchronisation round does next with the contributions still pending (pure).

Before the deadline it waits. At the deadline the pending contributions are sorted into
critical and not (once per round, by the caller: `CLASSIFY`). After that: with nothing
critical pending the round gives up on the rest (they count as lost); a critical MLP
contribution in relaxed mode (or an LM head partial) is recomputed by the coordinator
(stateless, weights memory-mapped); a critical contribution whose worker has been silent
too long ends the round (`WORKER_LOST`: the coordinator takes the worker over between
attempts and runs the token again); a critical attention contribution in relaxed mode is
asked for again (the activation re-sent, the interval doubling); otherwise the round waits
for it.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

MAX_WAIT_S = 0.05  # never sleep longer than this: control traffic and liveness need turns
MAX_RETRY_S = 0.05


class Act(Enum):
    DONE = "done"
    WAIT = "wait"
    CLASSIFY = "classify"
    GIVE_UP = "give_up"
    RECOMPUTE = "recompute"
    WORKER_LOST = "worker_lost"
    RETRY = "retry"


class RoundState(NamedTuple):  # (a tuple: built once or twice per round, cheaply)
    now: float
    deadline: float
    pending: frozenset[int]
    critical: frozenset[int] | None  # None until classified at the deadline
    silent: frozenset[int]  # pending workers not heard from for the death threshold
    relaxed: bool
    recomputable: bool  # the coordinator can compute it itself (MLP, the LM head's rows)
    next_retry: float


class Decision(NamedTuple):
    act: Act
    devices: frozenset[int] = frozenset()
    timeout: float = 0.0


def decide(s: RoundState) -> Decision:
    if not s.pending:
        return Decision(Act.DONE)
    if s.now < s.deadline:
        return Decision(Act.WAIT, timeout=min(MAX_WAIT_S, s.deadline - s.now))
    if s.critical is None:
        return Decision(Act.CLASSIFY)
    crit = s.critical & s.pending
    if not crit:
        return Decision(Act.GIVE_UP, s.pending)
    if s.recomputable and s.relaxed:
        return Decision(Act.RECOMPUTE, crit)
    if crit & s.silent:
        return Decision(Act.WORKER_LOST, crit & s.silent)
    if s.relaxed:
        if s.now >= s.next_retry:
            return Decision(Act.RETRY, crit)
        return Decision(Act.WAIT, timeout=min(MAX_WAIT_S, s.next_retry - s.now))
    return Decision(Act.WAIT, timeout=MAX_WAIT_S)


def next_retry_interval(interval: float) -> float:
    """After a retry, the next one waits twice as long (up to MAX_RETRY_S)."""
    return min(2 * interval, MAX_RETRY_S)
