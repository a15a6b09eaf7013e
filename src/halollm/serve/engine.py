"""One generation at a time, in one thread, in arrival order.

The model (a single device or a cluster coordinator) is not thread-safe and a cluster has one
set of KV caches, so requests are queued first come, first served and run one after another
in a dedicated thread. The queue is bounded (`max_queue` waiting requests; one more is
refused with QueueFull). A request streams its text pieces back to the asyncio side through a
queue; cancelling it (client gone) stops the generation before the next model step.
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
from halollm.serve.limits import DEFAULT_MAX_QUEUE

# between requests, keep a cluster's sessions alive this often, and notice lost or returning
# workers (so the web page's cluster view is live while nobody chats)
IDLE_S = 1.0


class Cancelled(Exception):
    """Raised inside the generation loop when the client went away."""


class QueueFull(Exception):
    """submit() while max_queue requests are already waiting."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests are waiting")
        self.waiting = waiting


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: Sequence[str]
    loop: asyncio.AbstractEventLoop
    ignore_eos: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text"|"done"|"error", x)
    cancelled: threading.Event = field(default_factory=threading.Event)
    number: int = 0

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class _Watched:
    """The decoder as one job sees it: every model step first checks that the job's client
    is still there, and is counted."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self.engine, self.job = engine, job

    def forward_last(self, ids: Sequence[int], start: int) -> Any:
        if self.job.cancelled.is_set():
            raise Cancelled
        t0 = time.perf_counter()
        logits = self.engine.decoder.forward_last(ids, start)
        self.engine.steps += 1  # only the engine thread writes it
        if self.engine.on_step is not None:
            self.engine.on_step(1e3 * (time.perf_counter() - t0), len(ids), self.job.number)
        return logits


class Engine:
    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, max_position: int,
                 on_result: Callable[[GenerationResult, float], None] | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_queue < 1:
            raise HaloError(f"--max-queue must be at least 1 (got {max_queue})")
        self.decoder, self.tokenizer, self.max_position = decoder, tokenizer, max_position
        self.on_result, self.max_queue = on_result, max_queue
        # (ms, tokens, request number) after every model step, on the engine thread
        self.on_step: Callable[[float, int, int], None] | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()  # waiting/cancelled change on both threads
        self.started = self.finished = 0
        self.waiting = 0
        self.busy = False
        self.cancelled = 0
        self.steps = 0  # model steps (prefill + decode), cancelled requests included
        self._thread = threading.Thread(target=self._run, name="halo-engine", daemon=True)
        self._thread.start()

    @property
    def full(self) -> bool:
        return self.waiting >= self.max_queue

    def submit(self, job: Job) -> int:
        """Queue a job; returns how many jobs are ahead of it. Raises QueueFull when
        max_queue jobs are already waiting."""
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(self.waiting)
            job.number = next(self._numbers)
            ahead = self.waiting + (1 if self.busy else 0)
            self.waiting += 1
            self._queue.put(job)
        return ahead

    def _count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

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
            with self._lock:
                self.waiting -= 1
                self.busy = not job.cancelled.is_set()
            if not self.busy:
                self._count_cancelled()
                continue
            self._execute(job)

    def _execute(self, job: Job) -> None:
        self.started += 1
        t0 = time.perf_counter()
        try:
            try:
                result = generate(_Watched(self, job), self.tokenizer, job.prompt_ids,
                                  max_tokens=job.max_tokens, sampling=job.sampling,
                                  stop=job.stop, max_position=self.max_position,
                                  on_text=lambda piece, j=job: self._piece(j, piece),
                                  ignore_eos=job.ignore_eos)
            except Cancelled:
                self._count_cancelled()
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
