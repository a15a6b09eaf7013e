"""Noticing that the other end has gone: its TCP connection closes. (A worker watches its
coordinator's connections; the coordinator watches each worker's, `PeerWatch`, while it
waits for a plan to load -- a worker building shards sends no heartbeats.)

A ZeroMQ socket monitor reports every connection that closes, by file descriptor: at once
when the coordinator's process ends (the kernel closes its sockets), within ZeroMQ's
heartbeat timeout (messages.harden) when its machine or the network vanished. The worker
remembers which descriptor its session's Join arrived on (ZMQ_SRCFD), so a stranger opening
and closing connections never ends a session.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

MAX_EVENTS = 1024  # read per call at most: a connection flood cannot stall the loop


def _events(monitor: zmq.Socket) -> Iterator[dict[str, Any]]:
    """The monitor's waiting events, at most MAX_EVENTS (never blocks)."""
    for _ in range(MAX_EVENTS):
        if not monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            break  # the usual case, every turn of a loop: no exception
        try:
            yield recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            break


def _stop(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Stop a socket's monitor, then close our end of it -- in that order: a monitor left
    running past its reader's close stalled the ZeroMQ context, so that later sockets in the
    process (a new coordinator's links) never got their messages through."""
    if not sock.closed:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
    monitor.close(0)


class ConnectionWatch:
    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.fd = self._monitor.getsockopt(zmq.FD)

    def closed(self) -> set[int]:
        """Descriptors of the connections that closed since the last call."""
        out: set[int] = set()
        for event in _events(self._monitor):
            if event["event"] == zmq.EVENT_ACCEPTED:
                out.discard(int(event["value"]))  # the number is in use again
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                out.add(int(event["value"]))
        return out

    @staticmethod
    def fd_of(frame: Any) -> int | None:
        """The descriptor of the connection a received frame came on."""
        try:
            return int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return None

    def close(self) -> None:
        _stop(self._sock, self._monitor)


class PeerWatch:
    """A client socket's one connection (the coordinator's DEALER to a worker): whether it
    is down now, by its latest connect or disconnect event."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.down = False

    def dropped(self) -> bool:
        for event in _events(self._monitor):
            self.down = event["event"] == zmq.EVENT_DISCONNECTED
        return self.down

    def close(self) -> None:
        _stop(self._sock, self._monitor)
