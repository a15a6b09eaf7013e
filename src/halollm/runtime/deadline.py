"""How long the coordinator waits for non-critical contributions (pure, testable)."""

from __future__ import annotations

from collections import deque

PREFILL_MS_PER_TOKEN = 0.25


class DeadlineEstimator:
    """Deadline = a high percentile of recently observed arrival delays, times a margin,
    plus a floor; never a fixed constant alone. Late arrivals are observed too, so the
    deadline grows when a link slows down and shrinks when it recovers."""

    def __init__(self, percentile: float = 0.95, factor: float = 1.3, slack_ms: float = 0.3,
                 warmup_ms: float = 30.0, min_ms: float = 0.5, max_ms: float = 100.0,
                 window: int = 300, fixed_ms: float | None = None) -> None:
        self.percentile, self.factor, self.slack_ms = percentile, factor, slack_ms
        self.warmup_ms, self.min_ms, self.max_ms = warmup_ms, min_ms, max_ms
        self.fixed_ms = fixed_ms
        self.samples: deque[float] = deque(maxlen=window)
        self._cached: float | None = None
        self._since = 0

    def observe(self, delay_ms: float) -> None:
        self.samples.append(delay_ms)
        self._since += 1
        if self._since >= 16:  # re-rank every 16 samples: sorting per round costs too much
            self._cached, self._since = None, 0

    def deadline_ms(self, ntok: int = 1) -> float:
        """The wait for a round of ntok tokens (prefill rounds get proportionally longer)."""
        if self.fixed_ms is not None:
            base = self.fixed_ms
        elif len(self.samples) < 20:
            base = self.warmup_ms
        else:
            if self._cached is None:
                ordered = sorted(self.samples)
                p = ordered[min(len(ordered) - 1, int(self.percentile * len(ordered)))]
                self._cached = min(self.max_ms, max(self.min_ms, p * self.factor +
                                                    self.slack_ms))
            base = self._cached
        if ntok > 1:  # a few fragments more per token; a miss is computed locally anyway
            base = base + PREFILL_MS_PER_TOKEN * ntok
        return base
