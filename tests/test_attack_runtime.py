"""A hostile peer against a real worker process on loopback (issue 17): what is bounded
before the key is checked, what a key holder's malformed message does, and that nothing
captured -- a Hello, a Join, control messages -- can be replayed to take a worker over.
Replayed datagrams against a live generation: tests/test_attack_replay.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from halollm.model.loader import content_hash, open_source
from halollm.runtime import handshake
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.messages import (
    Challenge,
    Heartbeat,
    Join,
    Ping,
    Plan,
    Pong,
    Ready,
    Refused,
    Welcome,
    decode,
    encode,
    encode_clear,
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
    """A coordinator-side DEALER that holds the key and speaks the control protocol; it
    keeps every frame it sent (what an eavesdropper would have captured)."""

    def __init__(self, address: tuple[str, int], model_hash: str, key: str = KEY) -> None:
        self.key, self.model_hash = cluster_key(key), model_hash
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address[0]}:{address[1]}")
        self.sent: list[list[bytes]] = []
        self.link: handshake.LinkChannels | None = None

    def send_frames(self, frames: list[bytes]) -> None:
        self.sent.append(frames)
        self.sock.send_multipart(frames)

    def send(self, msg) -> None:
        assert self.link is not None
        self.send_frames(encode(self.link.control, msg))

    def receive(self, kind: type, timeout_s: float = 30.0):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.sock.poll(200):
                msg = decode(self.sock.recv_multipart(),
                             None if self.link is None else self.link.control)
                if isinstance(msg, kind):
                    return msg
        return None

    def join(self, session: int = SESSION) -> Welcome | Refused:
        hello, nonce = handshake.hello(session)
        self.send_frames(encode_clear(hello))
        challenge = self.receive(Challenge, 30)
        assert challenge is not None
        self.link = handshake.coordinator_channels(self.key, nonce, challenge)
        self.send(Join(session, self.model_hash, ["127.0.0.1", 9]))
        reply = self.receive((Welcome, Refused), 60)
        assert reply is not None
        return reply

    def close(self) -> None:
        self.sock.close(0)


def test_a_plan_naming_a_neuron_the_model_lacks_is_refused_and_the_worker_lives(
        worker, model_hash):
    peer = Peer(worker.addresses[0], model_hash)
    try:
        assert isinstance(peer.join(), Welcome)
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
        assert isinstance(peer.join(), Welcome)
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
        assert isinstance(peer.join(), Welcome)
        floods = [subprocess.Popen([sys.executable, "-c", FLOOD, host, str(port), "5"])
                  for _ in range(2)]
        beats = []
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            if peer.sock.poll(100):
                msg = decode(peer.sock.recv_multipart(), peer.link.control)
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


def _pong(peer: Peer, t: float) -> bool:
    peer.send(Ping(SESSION, t))
    pong = peer.receive(Pong, 10)
    return pong is not None and pong.t == t


def test_a_replayed_join_or_control_message_never_displaces_the_session(worker, model_hash):
    """An eavesdropper replays a whole captured join (Hello, then the sealed Join) and the
    session's control messages on its own connection, over and over: it gets a challenge and
    a refusal, the real session carries on, and the worker counts what it rejected."""
    real = Peer(worker.addresses[0], model_hash)
    attacker = Peer(worker.addresses[0], model_hash, key="not the key")
    try:
        assert isinstance(real.join(), Welcome)
        assert _pong(real, 1.0)
        captured = list(real.sent)  # hello, join, ping
        refusals = 0
        for _ in range(20):
            for frames in captured:
                attacker.sock.send_multipart(frames)
            while attacker.sock.poll(100):
                reply = decode(attacker.sock.recv_multipart(), None)
                refusals += isinstance(reply, Refused)
        assert refusals >= 1  # the replayed Join does not open with the new challenge's keys
        for frames in captured[1:]:  # and on the real connection: counters already used
            real.sock.send_multipart(frames)
        assert _pong(real, 2.0), "the real coordinator lost its session"
        beat = real.receive(Heartbeat, 5)
        assert beat is not None
        counts = beat.stats["datagrams"]
        assert counts.get("unauthenticated", 0) >= 1 and counts.get("replayed", 0) >= 2, counts
        # a wrong key's own join is refused in clear, naming the reason
        assert isinstance(attacker.join(), Refused)
    finally:
        real.close()
        attacker.close()
    assert worker.procs[0].poll() is None


def test_a_real_join_succeeds_during_a_connection_flood(worker, model_hash):
    """Hundreds of TCP connections that never speak ZMTP (dropped by ZeroMQ's handshake
    timeout) and hundreds that complete the ZMTP handshake and then idle: a real join gets
    through meanwhile, and the worker's CPU is not eaten by them."""
    import socket

    host, port = worker.addresses[0]
    ctx = zmq.Context.instance()
    idle, dealers = [], []
    pid = worker.procs[0].pid
    try:
        for _ in range(300):
            idle.append(socket.create_connection((host, port), timeout=5))
        for _ in range(300):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(f"tcp://{host}:{port}")
            dealers.append(d)
        time.sleep(2.0)
        cpu0, t0 = _cpu_s(pid), time.monotonic()
        time.sleep(2.0)
        busy = (_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
        assert busy < 0.5, f"the idle connections keep the worker {busy:.0%} busy"
        peer = Peer(worker.addresses[0], model_hash)
        try:
            assert isinstance(peer.join(), Welcome)
        finally:
            peer.close()
    finally:
        for s in idle:
            s.close()
        for d in dealers:
            d.close(0)
    assert worker.procs[0].poll() is None


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_worker_ends_a_session_whose_coordinator_vanished(model_hash, tmp_path):
    status = tmp_path / "status.json"
    with LocalWorkers(1, KEY, threads=1, extra_args=["--status-file", str(status)]) as lw:
        peer = Peer(lw.addresses[0], model_hash)
        assert isinstance(peer.join(), Welcome)

        def session() -> str | None:
            try:
                return json.loads(status.read_text()).get("session")
            except (OSError, ValueError):
                return "unreadable"

        end = time.monotonic() + 10
        while session() != f"{SESSION:08x}" and time.monotonic() < end:
            time.sleep(0.1)
        assert session() == f"{SESSION:08x}"
        peer.close()  # the coordinator's process is gone: its connection closes
        t0 = time.monotonic()
        while session() is not None and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert session() is None, "the worker kept a session whose coordinator vanished"
        assert time.monotonic() - t0 < 8.0  # a few heartbeats, not the 900 s idle timeout
