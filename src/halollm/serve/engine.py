"""One generation at a time, in one thread, in arrival order.

The model (a single device or a cluster coordinator) is not thread-safe and a cluster has one
set of KV caches, so requests are queued first come, first served and run one after another
in a dedicated thread. A request streams its text pieces back to the asyncio side through a
queue; cancelling it (client gone) stops the generation at the next token.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from halollm.errors import HaloError
from halollm.generate import Decoder, GenerationResult, generate
from halollm.model.tokenizer import Tokenizer
from halollm.sampling import SamplingParams

IDLE_S = 20.0  # between requests, keep a cluster's sessions alive this often


class Cancelled(Exception):
    """Raised inside the generation loop when the client went away."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: Sequence[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text"|"done"|"error", x)
    cancelled: threading.Event = field(default_factory=threading.Event)
    number: int = 0

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, max_position: int,
                 on_result: Callable[[GenerationResult, float], None] | None = None) -> None:
        self.decoder, self.tokenizer, self.max_position = decoder, tokenizer, max_position
        self.on_result = on_result
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._numbers = itertools.count(1)
        self.started = self.finished = 0
        self.waiting = 0
        self.busy = False
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="halo-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> int:
        """Queue a job; returns how many jobs are ahead of it."""
        job.number = next(self._numbers)
        ahead = self.waiting + (1 if self.busy else 0)
        self.waiting += 1
        self._queue.put(job)
        return ahead

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        idle = getattr(self.decoder, "idle", None)
        while True:
            try:
                job = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                if idle is not None:
                    try:
                        idle()
                    except HaloError:
                        pass  # reported on the next request
                continue
            if job is None:
                return
            self.waiting -= 1
            if job.cancelled.is_set():
                self.cancelled += 1
                continue
            self.busy = True
            self.started += 1
            t0 = time.perf_counter()
            try:
                result = generate(self.decoder, self.tokenizer, job.prompt_ids,
                                  max_tokens=job.max_tokens, sampling=job.sampling,
                                  stop=job.stop, max_position=self.max_position,
                                  on_text=lambda piece, j=job: self._piece(j, piece))
            except Cancelled:
                self.cancelled += 1
                job.emit("error", "cancelled")
            except HaloError as exc:
                job.emit("error", str(exc))
            except Exception as exc:  # a bug: report it to the client, keep serving
                job.emit("error", f"internal error: {exc!r}")
            else:
                if self.on_result is not None:
                    self.on_result(result, time.perf_counter() - t0)
                job.emit("done", result)
            finally:
                self.busy = False
                self.finished += 1

    @staticmethod
    def _piece(job: Job, piece: str) -> None:
        if job.cancelled.is_set():
            raise Cancelled
        job.emit("text", piece)
