"""The token history of the current request: every layer's attention input at every
position, which is what a worker needs to rebuild keys and values it missed (repair) or
never had (replay after a move or a rejoin), and what a takeover fills its caches from."""

from __future__ import annotations

import torch

from halollm.runtime.messages import KV_CHUNK_BYTES, Kv, tensor_blob


class History:
    def __init__(self, n_layers: int, dim: int) -> None:
        self.x = [torch.zeros(256, dim) for _ in range(n_layers)]
        self.length = [0] * n_layers
        self.request = 0

    def start_request(self) -> None:
        self.request += 1
        self.length = [0] * len(self.length)

    def record(self, layer: int, start: int, x: torch.Tensor) -> None:
        end = start + x.shape[0]
        buf = self.x[layer]
        if end > buf.shape[0]:
            grown = torch.zeros(max(end, 2 * buf.shape[0]), buf.shape[1])
            grown[: buf.shape[0]] = buf
            self.x[layer] = buf = grown
        buf[start:end] = x.float()
        self.length[layer] = max(self.length[layer], end)

    def rows(self, layer: int, start: int, end: int) -> torch.Tensor:
        return self.x[layer][start:end]

    def all_rows(self, layer: int) -> torch.Tensor:
        return self.x[layer][: self.length[layer]]

    def repair(self, session: int, layer: int, positions: list[int]) -> list[Kv]:
        """Messages carrying the asked positions of a layer that the history holds."""
        known = [p for p in sorted(set(positions)) if 0 <= p < self.length[layer]]
        return [Kv(session, self.request, layer, s, n, False,
                   tensor_blob(self.rows(layer, s, s + n)))
                for start, total in runs(known) for s, n in self._chunks(start, total)]

    def replay(self, session: int, layers: list[int]) -> list[Kv]:
        """Messages carrying every recorded position of these layers (a worker's new
        attention groups get their keys and values)."""
        return [Kv(session, self.request, layer, s, n, True,
                   tensor_blob(self.rows(layer, s, s + n)))
                for layer in layers for s, n in self._chunks(0, self.length[layer])]

    def _chunks(self, start: int, n: int) -> list[tuple[int, int]]:
        """(start, count) pieces of a run small enough for one control message."""
        step = max(1, KV_CHUNK_BYTES // (4 * self.x[0].shape[1]))
        return [(s, min(step, start + n - s)) for s in range(start, start + n, step)]


def runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> (start, length) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out
