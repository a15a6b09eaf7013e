"""The door of `halo serve`, as plain ASGI middleware in front of FastAPI: the API key on
/v1/ routes (401) and the request body size limit (413), both settled before a route or
the JSON parser sees a byte of the body.

The body is read here, at most `max_body` bytes of it, and handed on to the app; a body
that is larger (by its Content-Length or as it streams in) is answered 413 at once. Up to
DRAIN_LIMIT bytes of an oversized body are read and dropped first, so an ordinary client
that sends its whole body before reading the reply sees the 413 instead of a reset
connection; beyond that the connection is simply closed after the 413.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from halollm.serve.limits import DEFAULT_MAX_BODY
from halollm.serve.schemas import error_body

__all__ = ["DEFAULT_MAX_BODY", "Guard"]

DRAIN_LIMIT = 16 << 20

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def send_json(send: Send, status: int, body: dict[str, Any], close: bool = False
                    ) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class Guard:
    def __init__(self, app: Any, api_key: str | None, max_body: int,
                 count: Callable[[str, int], None]) -> None:
        self.app, self.api_key, self.max_body, self.count = app, api_key, max_body, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key and path.startswith("/v1/") and not self._authorized(scope):
            self.count(path, 401)
            await send_json(send, 401, error_body("invalid or missing API key",
                                                  "authentication_error",
                                                  code="invalid_api_key"))
            return
        declared = self._content_length(scope)
        if declared is not None and declared < 0:
            await self._reject(send, path, 400, "the Content-Length header is not a number")
            return
        if declared is not None and declared > self.max_body:
            if declared <= DRAIN_LIMIT:
                await self._drain(receive)
            await self._too_large(send, path)
            return
        body = await self._read(receive)
        if body is None:
            await self._too_large(send, path)
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return secrets.compare_digest(given, f"Bearer {self.api_key}".encode())

    @staticmethod
    def _content_length(scope: Scope) -> int | None:
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return -1
        return None

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None (the rest drained up to DRAIN_LIMIT) once it exceeds
        max_body."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # the client left; the app will see it too
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _drain(receive: Receive, seen: int = 0) -> None:
        while seen <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _too_large(self, send: Send, path: str) -> None:
        await self._reject(send, path, 413, f"the request body is larger than the server's "
                                            f"limit of {self.max_body} bytes (--max-body)",
                           code="request_too_large")

    async def _reject(self, send: Send, path: str, status: int, message: str,
                      code: str | None = None) -> None:
        self.count(path, status)
        await send_json(send, status, error_body(message, "invalid_request_error", code=code),
                        close=True)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the buffered body once, then the connection's own messages
    (so the app still hears of a disconnect)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
