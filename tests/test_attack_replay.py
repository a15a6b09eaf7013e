"""Replayed data-plane datagrams against a real cluster on loopback (issue 17): every datagram
a live relaxed-mode generation sent, captured as it left the coordinator, sent to the worker
again -- after the generation and during the next one. The worker rejects and counts them
all, computes no extra round, keeps its KV state, and the output does not change. (The
deadline is long, so that a worker slowed by the flood is late, never lost: what is tested is
that no replay changes the worker's state.)"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from halollm.generate import generate
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams

KEY = "replay-test-key"
PROMPT = "A good breakfast before a long day of walking is"
GREEDY = SamplingParams(temperature=0.0)


class RecordingSocket:
    """The coordinator's UDP socket, keeping a copy of every datagram it sends."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self.sent = sock, []

    def sendto(self, data: bytes, addr) -> int:
        self.sent.append((bytes(data), addr))
        return self._sock.sendto(data, addr)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def _worker_counts(coord: Coordinator) -> tuple[int, dict]:
    """(rounds computed, datagram counters) from the worker's latest heartbeat."""
    end = time.monotonic() + 2.0
    while time.monotonic() < end:  # a few fresh heartbeats
        coord.idle()
        time.sleep(0.1)
    beat = coord.links.links[0].heartbeat
    return beat["rounds"], beat["datagrams"]


@pytest.mark.slow
def test_replayed_datagrams_are_rejected_and_change_nothing():
    with LocalWorkers(1, KEY, threads=1) as lw:
        coord = Coordinator(None, "fp32", lw.addresses, cluster_key(KEY), ClusterOptions.build(
            mode="relaxed", predictor=None, attn_groups=3, coordinator_share=0.5,
            deadline_ms=5000))  # a long deadline: lateness under the flood is no loss
        try:
            recorder = RecordingSocket(coord.udp.sock)
            coord.udp.sock = recorder  # type: ignore[assignment]
            coord.udp.native = None  # its sends through sendto, to be recorded (the
            # worker's receive stays native where built: its replay windows are tested)
            ids = coord.tokenizer.encode(PROMPT)
            first = generate(coord, coord.tokenizer, ids, max_tokens=8, sampling=GREEDY,
                             ignore_eos=True).token_ids
            captured = list(recorder.sent)
            assert len(captured) > 100
            rounds, before = _worker_counts(coord)

            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for data, addr in captured:  # after the generation
                raw.sendto(data, addr)
            rounds_after, after = _worker_counts(coord)
            assert rounds_after == rounds, "a replayed datagram made the worker compute"
            rejected = sum(after.get(k, 0) - before.get(k, 0) for k in ("replayed", "too_old"))
            # all of them (loopback may drop a few of a burst): seen, or behind the window
            assert rejected >= 0.9 * len(captured), (rejected, len(captured), after)

            stop = threading.Event()

            def replay() -> None:  # during the next generation, over and over, at a rate
                while not stop.is_set():  # that does not fill the worker's receive buffer
                    for i, (data, addr) in enumerate(captured):  # (a flood is loss, not this)
                        raw.sendto(data, addr)
                        if i % 50 == 49:
                            time.sleep(0.02)

            t = threading.Thread(target=replay, daemon=True)
            t.start()
            try:
                second = generate(coord, coord.tokenizer, ids, max_tokens=8, sampling=GREEDY,
                                  ignore_eos=True).token_ids
            finally:
                stop.set()
                t.join(10)
            raw.close()
            sync = coord.sync_json()
            assert second == first, ("replayed datagrams changed the output", sync)
            assert sync["takeovers"] == [] and sync["lost"] == 0, sync
        finally:
            coord.close()
