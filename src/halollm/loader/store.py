"""A cache of group weights under a byte budget, with a background loader.

Decoding visits the groups in the same cyclic order every token (layer 0 attention, layer 0
MLP, layer 1 attention, …). With that order known, the group to evict is the one needed
farthest in the future (Belady's rule, optimal for a known sequence): a budget of X% keeps
a fixed X% resident and streams the rest, instead of streaming everything as a plain LRU or
a sliding window must. Groups of one layer half are needed together; among them the less
significant is evicted first.

Policies:

* ``prefetch`` (HALO): the farthest-future rule, and a background thread that loads the next
  groups in order while the current ones compute, never evicting a group needed before the
  one it loads;
* ``demand``: the same cache, no background thread (a group is read when it is needed);
* ``window`` (TPI-LLM's sliding window): a group is dropped as soon as it has been used, and
  the background thread fills the budget with the groups that come next.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from halollm.errors import HaloError
from halollm.groups import GroupId
from halollm.loader.weights import GroupWeights

POLICIES = ("prefetch", "demand", "window")
# Groups the prefetch policy loads ahead of the computation (loaded, not yet reached). A
# group loads in well under the time its predecessor computes (a read of its packed bytes),
# so two suffice; more would push Belady's resident set out (each group loaded ahead takes the
# room of one that must then be read again: unbounded, prefetch degenerates into a window
# that reads the whole model every token -- measured 58 of 63 MiB at a 50% budget).
PREFETCH_AHEAD = 2


@dataclass
class LoaderStats:
    hits: int = 0  # groups already resident when the computation needed them
    skipped: int = 0  # non-critical groups not resident when needed, left out (relaxed)
    misses: int = 0  # groups it had to wait for (being loaded, or read on demand)
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0  # bytes read (of the group cache, or of the model file)
    load_ms: float = 0.0  # time spent reading and dequantizing, by any thread
    stall_ms: float = 0.0  # time the computation waited for groups
    peak_resident_bytes: int = 0
    per_token: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        hidden = 1.0 - self.stall_ms / self.load_ms if self.load_ms > 0 else 1.0
        return {"hits": self.hits, "misses": self.misses, "skipped": self.skipped,
                "loads": self.loads,
                "evictions": self.evictions, "bytes_loaded": self.bytes_loaded,
                "load_ms": round(self.load_ms, 2), "stall_ms": round(self.stall_ms, 2),
                "hidden_share": round(max(0.0, hidden), 4),
                "peak_resident_bytes": self.peak_resident_bytes,
                "per_token": self.per_token}


class GroupStore:
    """Group weights within `budget` bytes (as loaded: packed, or in the float dtype)."""

    def __init__(self, order: Sequence[GroupId], sizes: dict[GroupId, int],
                 load: Callable[[GroupId], GroupWeights], budget: int, policy: str = "prefetch",
                 significance: dict[GroupId, float] | None = None,
                 keep: frozenset[GroupId] = frozenset(),
                 release: Callable[[GroupId], None] | None = None) -> None:
        if policy not in POLICIES:
            raise HaloError(f"--loader must be one of {', '.join(POLICIES)}")
        self.order = list(order)
        self.pos = {g: i for i, g in enumerate(self.order)}
        self.sizes, self._load, self.budget, self.policy = sizes, load, budget, policy
        self.sig = significance or {}
        self.keep = keep  # evicted only when nothing else is left (the critical groups)
        # told of each evicted group once nothing computes with it (the computation is done
        # with every group but the one at the cursor, which is never evicted): a loader
        # reusing the group's memory
        self._release = release
        self.stats = LoaderStats()
        self.resident: dict[GroupId, GroupWeights] = {}
        self.inflight: set[GroupId] = set()
        self.ahead: set[GroupId] = set()  # loaded by the loader thread, not reached yet
        self.used = 0  # bytes resident or being loaded
        self.cursor = 0  # position in `order` of the group being computed
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        if policy != "demand":
            self._thread = threading.Thread(target=self._prefetch_loop, name="halo-loader",
                                            daemon=True)
            self._thread.start()

    # -- the computation's side ---------------------------------------------------------
    def get(self, gid: GroupId) -> GroupWeights:
        """The weights of `gid`, waiting for (or doing) its load if it is not resident."""
        with self._cv:
            w = self._arrive(gid)
            if w is not None:
                self.stats.hits += 1
                return w
            self.stats.misses += 1
            t0 = time.perf_counter()
            while gid in self.inflight:
                self._cv.wait()
            w = self.resident.get(gid)
            if w is None:
                self._make_room(self.sizes[gid], before=None)
                self.inflight.add(gid)
                self.used += self.sizes[gid]
        if w is None:
            w = self._do_load(gid)
        with self._cv:
            self.stats.stall_ms += 1e3 * (time.perf_counter() - t0)
        return w

    def get_if_resident(self, gid: GroupId) -> GroupWeights | None:
        """The weights of `gid` if resident now, else None (counted as skipped): relaxed
        decoding leaves out a non-critical group rather than wait for it."""
        with self._cv:
            w = self._arrive(gid)
            if w is None:
                self.stats.skipped += 1
            else:
                self.stats.hits += 1
            return w

    def _arrive(self, gid: GroupId) -> GroupWeights | None:
        """The computation has reached `gid` (lock held): move the cursor, wake the loader."""
        if self.policy == "window":
            self._drop_behind(self.pos[gid])
        self.cursor = self.pos[gid]
        self.ahead.discard(gid)
        if self._thread is not None and len(self.resident) + len(self.inflight) < len(
                self.order):
            self._cv.notify_all()  # something is left to load (else the loader sleeps on)
        return self.resident.get(gid)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- loading and evicting -----------------------------------------------------------
    def _distance(self, gid: GroupId) -> int:
        """How many groups from the one being computed until `gid` is needed again."""
        return (self.pos[gid] - self.cursor) % len(self.order)

    def _victims(self) -> Iterator[GroupId]:
        """Resident groups, the first to evict first: needed farthest in the future (the
        positions just behind the cursor, walking backwards), groups to keep (critical) last.
        (Distances are distinct, so this is the order of a sort by distance, without the
        sort: a victim is usually found in a step or two.)"""
        n = len(self.order)
        for keep in (False, True):
            for step in range(1, n):
                g = self.order[(self.cursor - step) % n]
                if g in self.resident and (g in self.keep) == keep:
                    yield g

    def _make_room(self, size: int, before: GroupId | None) -> bool:
        """Evict until `size` more bytes fit. With `before`, only groups needed after it
        (a prefetch must not push out what is needed sooner); False if that is not enough."""
        if self.used + size <= self.budget:
            return True
        limit = None if before is None else self._distance(before)
        for victim in self._victims():
            if self.used + size <= self.budget:
                break
            if victim == self.order[self.cursor]:
                continue  # in use right now
            if limit is not None and self._distance(victim) <= limit:
                return False
            self.used -= self.sizes[victim]
            self._evict(victim)
        return self.used + size <= self.budget

    def _evict(self, gid: GroupId) -> None:
        del self.resident[gid]
        self.ahead.discard(gid)
        self.stats.evictions += 1
        if self._release is not None:
            self._release(gid)

    def _do_load(self, gid: GroupId) -> GroupWeights:
        t0 = time.perf_counter()
        try:
            w = self._load(gid)
        except BaseException:
            with self._cv:
                self.inflight.discard(gid)
                self.ahead.discard(gid)
                self.used -= self.sizes[gid]
                self._cv.notify_all()
            raise
        with self._cv:
            self.stats.load_ms += 1e3 * (time.perf_counter() - t0)
            self.stats.loads += 1
            self.stats.bytes_loaded += w.file_bytes
            self.inflight.discard(gid)
            self.resident[gid] = w
            self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.used)
            self._cv.notify_all()
        return w

    def _drop_behind(self, new_cursor: int) -> None:
        """Window policy: the groups used since the last call are released at once."""
        n = len(self.order)
        i = self.cursor
        while i != new_cursor:
            g = self.order[i]
            if g in self.resident:
                self.used -= self.sizes[g]
                self._evict(g)
            i = (i + 1) % n

    def _next_to_load(self) -> GroupId | None:
        n = len(self.order)
        for step in range(1, n):
            g = self.order[(self.cursor + step) % n]
            if g not in self.resident and g not in self.inflight:
                return g
        return None

    def _prefetch_loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    full = self.policy == "prefetch" and len(self.ahead) >= PREFETCH_AHEAD
                    gid = None if full else self._next_to_load()
                    if gid is not None and self._make_room(self.sizes[gid], before=gid):
                        self.inflight.add(gid)
                        self.ahead.add(gid)
                        self.used += self.sizes[gid]
                        break
                    self._cv.wait(timeout=0.5)
            try:
                self._do_load(gid)
            except Exception:  # the computation will read it itself and see the error
                continue
