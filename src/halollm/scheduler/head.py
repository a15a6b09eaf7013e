"""Who computes the LM head under `--placement halo`: the coordinator, or the workers by
vocabulary rows (runtime/head_split.py), whichever is predicted faster (a pure function).

The head is a large matrix (vocabulary x hidden: a quarter of m1024's weights, more than a
third of SmolLM2-135M's) that every token needs once. On a CPU-capped coordinator computing it
costs more than a round that hands its rows to the workers; on a fast coordinator with slow
links, less. The layer plan does not price it (the placement program places layer groups), so
it is decided here, from the same measurements, each time a plan is made: the head's rows go to
the workers (those the plan uses, or every live one, whichever is predicted faster) when a head
round over them is predicted at least `hysteresis` faster than the coordinator alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# An MLP neuron is 3 x hidden multiply-adds (gate, up, down); a head row is hidden of them.
HEAD_ROWS_PER_NEURON = 3.0


@dataclass(frozen=True)
class HeadWorker:
    index: int  # the runtime's device number
    speed: float  # MLP neurons per ms (its profile)
    rtt_ms: float  # a round trip besides compute (live, else probed)


def head_ms_alone(vocab: int, speed: float, call_ms: float = 0.0) -> float:
    """The coordinator computing every row of the head."""
    return vocab / HEAD_ROWS_PER_NEURON / speed + call_ms


def head_ms_split(vocab: int, workers: Sequence[HeadWorker], hub_ms: float,
                  hub_round_ms: float) -> float:
    """A head round over `workers` (rows dealt out evenly): the slowest worker's rows and
    round trip, or the coordinator's own work for the round, whichever is longer."""
    rows = vocab / len(workers)
    slowest = max(rows / HEAD_ROWS_PER_NEURON / w.speed + w.rtt_ms for w in workers)
    return max(slowest, hub_round_ms + hub_ms * len(workers))


def head_workers(vocab: int, speed: float, call_ms: float, hub_ms: float, hub_round_ms: float,
                 candidates: Sequence[Sequence[HeadWorker]], hysteresis: float
                 ) -> tuple[list[int], dict[str, Any]]:
    """(the workers that get the head's rows, in order; none: the coordinator computes it)
    and a record of the prediction: the fastest candidate set of workers, if a round over it
    is predicted at least `hysteresis` faster than the coordinator alone."""
    alone = head_ms_alone(vocab, speed, call_ms)
    record: dict[str, Any] = {"coordinator_ms": round(alone, 3)}
    best: tuple[float, list[int]] | None = None
    for workers in candidates:
        if workers:
            ms = head_ms_split(vocab, workers, hub_ms, hub_round_ms)
            if best is None or ms < best[0]:
                best = (ms, sorted(w.index for w in workers))
    if best is None:
        return [], {**record, "workers": 0}
    record["split_ms"] = round(best[0], 3)
    if best[0] > (1 - hysteresis) * alone:
        return [], {**record, "workers": 0}
    return best[1], {**record, "workers": len(best[1])}
