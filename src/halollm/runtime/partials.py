"""A synchronisation round's partials: what they make (`Output`: a sum over the whole
hidden state, or the LM head's rows side by side) and what a round has taken in so far
(`Taken`: recomputed tensors, bodies checked on arrival, the native taker's sum)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halollm.runtime.tensor_codec import place_bodies, sum_bodies


@dataclass(frozen=True)
class Output:
    """What a round's partials make: float32 [ntok, dim], each partial (in `wire`) adding to
    all of it, or with `spans` (the LM head's rows) each worker's to its own (offset, length)."""

    wire: int
    dim: int
    spans: dict[int, tuple[int, int]] | None = None

    def length(self, sender: int) -> int:
        return self.dim if self.spans is None else self.spans[sender][1]


class Taken:
    """What a round has taken in: recomputed partials, bodies checked on arrival (decoded
    together at the end), and what the native taker (`_wire.Gather`, or None) summed."""

    def __init__(self, native: object | None) -> None:
        self.native = native
        self.tensors: list[torch.Tensor] = []
        self.bodies: list[tuple[bytes, int, int]] = []  # (body, where its values start, sender)
        self.summed = 0  # partials the native taker added

    def arrived(self) -> list[tuple[int, float]]:
        """(sender, perf_counter time) of the partials the native taker completed since."""
        if self.native is None:
            return []
        out: list[tuple[int, float]] = self.native.arrived()  # type: ignore[attr-defined]
        self.summed += len(out)
        return out

    def drop(self, devices: frozenset[int]) -> None:
        """No longer waited for (recomputed): what these send now is late."""
        if self.native is not None:
            for i in devices:
                self.native.drop(i)  # type: ignore[attr-defined]

    def partials(self, out: Output, ntok: int) -> list[torch.Tensor]:
        parts = list(self.tensors)
        if self.bodies and out.spans is None:
            parts.append(sum_bodies([(b, off) for b, off, _ in self.bodies], out.wire, ntok,
                                    out.dim))
        elif self.bodies:
            spans = out.spans
            parts.append(place_bodies([(b, off, *spans[i]) for b, off, i in self.bodies],
                                      out.wire, out.dim))
        if self.summed:
            total = self.native.total()  # type: ignore[attr-defined]
            parts.append(torch.frombuffer(total, dtype=torch.float32).view(ntok, out.dim))
        return parts
