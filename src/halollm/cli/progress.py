"""Progress bars on stderr for long work (tqdm), one at a time."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm


class Bars:
    """bars(label, total) -> advance(n): starts a bar (closing the previous one)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None

    def __call__(self, label: str, total: int) -> Callable[[int], None]:
        self.close()
        self._bar = tqdm(total=total, desc=label, disable=None if self.enabled else True,
                         leave=True,
                         dynamic_ncols=True, mininterval=0.5)
        bar = self._bar
        return lambda n=1: bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
