"""Progress on stderr for long work: a tqdm bar on a terminal, one line per stage otherwise
(logs stay readable), nothing when disabled (--json)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm


class Bars:
    """bars(label, total) -> advance(n): starts a stage (closing the previous one)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None

    def __call__(self, label: str, total: int) -> Callable[[int], None]:
        self.close()
        if self.enabled and not sys.stderr.isatty():
            print(f"{label} ({total})…", file=sys.stderr, flush=True)
        self._bar = tqdm(total=total, desc=label, leave=True, dynamic_ncols=True,
                         mininterval=0.5, disable=not (self.enabled and sys.stderr.isatty()))
        bar = self._bar
        return lambda n=1: bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
