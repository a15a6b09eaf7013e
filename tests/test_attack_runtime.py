"""A hostile peer against a real worker process on loopback: what is bounded before the key is
checked, and what a key holder's malformed message does (issue 17, the runtime rows done so
far; replay protection and encryption are still open)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from halollm.model.loader import content_hash, open_source
from halollm.runtime.keys import key_bytes
from halollm.runtime.local import LocalWorkers
from halollm.runtime.messages import (
    PROTOCOL_VERSION,
    Heartbeat,
    Hello,
    Ping,
    Plan,
    Pong,
    Ready,
    Welcome,
    decode,
    encode,
    join_proof,
)

KEY = "attack-test-key"
SESSION = 4242
N_LAYERS = 30  # the default model's


@pytest.fixture(scope="module")
def worker():
    with LocalWorkers(1, KEY, threads=1) as lw:
        yield lw


@pytest.fixture(scope="module")
def model_hash() -> str:
    source = open_source(None)
    try:
        return content_hash(Path(source.path))
    finally:
        source.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Peer:
    """A coordinator-side DEALER that holds the key and speaks the control protocol."""

    def __init__(self, address: tuple[str, int], model_hash: str) -> None:
        self.key, self.model_hash = key_bytes(KEY), model_hash
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address[0]}:{address[1]}")

    def send(self, msg) -> None:
        self.sock.send_multipart(encode(self.key, msg))

    def receive(self, kind: type, timeout_s: float = 30.0):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.sock.poll(200):
                msg = decode(self.key, self.sock.recv_multipart())
                if isinstance(msg, kind):
                    return msg
        return None

    def join(self) -> Welcome:
        nonce = "n" * 32
        self.send(Hello(PROTOCOL_VERSION, SESSION, nonce, self.model_hash,
                        ["127.0.0.1", 9], join_proof(self.key, "coordinator", nonce,
                                                     self.model_hash)))
        welcome = self.receive(Welcome, 60)
        assert welcome is not None
        return welcome

    def close(self) -> None:
        self.sock.close(0)


def test_a_plan_naming_a_neuron_the_model_lacks_is_refused_and_the_worker_lives(
        worker, model_hash):
    peer = Peer(worker.addresses[0], model_hash)
    try:
        peer.join()
        empty = {"attn": {"groups": [], "units": []}, "mlp": {"groups": [], "units": []}}
        bad = {"attn": {"groups": [], "units": []}, "mlp": {"groups": [0], "units": [999999]}}
        layers = json.dumps([bad] + [empty] * (N_LAYERS - 1))
        peer.send(Plan(SESSION, 1, 1, "fp32", 0, 0, layers))
        ready = peer.receive(Ready)
        assert ready is not None and "unit the model does not have" in (ready.error or "")
        peer.send(Ping(SESSION, 1.5))
        pong = peer.receive(Pong)
        assert pong is not None and pong.t == 1.5
        assert worker.procs[0].poll() is None
    finally:
        peer.close()


def test_an_oversized_frame_is_refused_before_it_is_kept(worker, model_hash):
    pid = worker.procs[0].pid
    before = _rss_kib(pid)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    host, port = worker.addresses[0]
    raw.connect(f"tcp://{host}:{port}")
    try:
        raw.send(b"\0" * (200 << 20), copy=False)  # 200 MiB, beyond ZMQ_MAXMSGSIZE
        time.sleep(3.0)
        grown_mib = (_rss_kib(pid) - before) / 1024
        assert grown_mib < 100, f"worker RSS grew {grown_mib:.0f} MiB"
    finally:
        raw.close(0)
    peer = Peer(worker.addresses[0], model_hash)  # and a real join still works
    try:
        peer.join()
    finally:
        peer.close()


FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[3])
addr = (sys.argv[1], int(sys.argv[2]))
while time.monotonic() < end:
    for _ in range(1000):
        s.sendto(b"x", addr)
"""


def test_heartbeats_keep_their_turn_under_a_datagram_flood(worker, model_hash):
    peer = Peer(worker.addresses[0], model_hash)
    host, port = worker.addresses[0]
    floods = []
    try:
        peer.join()
        floods = [subprocess.Popen([sys.executable, "-c", FLOOD, host, str(port), "5"])
                  for _ in range(2)]
        beats = []
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            if peer.sock.poll(100):
                msg = decode(peer.key, peer.sock.recv_multipart())
                if isinstance(msg, Heartbeat):
                    beats.append(time.monotonic())
        gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
        assert len(beats) >= 3, beats
        assert max(gaps) < 2.0, f"longest heartbeat gap {max(gaps):.2f}s"  # the death threshold
        assert msg is not None
    finally:
        for f in floods:
            f.wait(timeout=20)
        peer.close()
    assert worker.procs[0].poll() is None
