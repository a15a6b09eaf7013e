"""The web page of `halo serve`: `/` (chat over /v1/chat/completions, and the cluster's live
view), its static files under `/static/` (package data: hand-written HTML, CSS and JS, no
build step, nothing fetched from elsewhere), `GET /status` (JSON) and `GET /status/events`
(the same object as server-sent events, every STREAM_EVERY_S)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from halollm.serve.status import Status

STATIC = Path(__file__).resolve().parent / "static"
STREAM_EVERY_S = 0.5
NO_CACHE = {"cache-control": "no-cache"}


async def status_events(status: Status) -> AsyncIterator[bytes]:
    """The status, again and again; ends when the client leaves (Starlette cancels it)."""
    yield b"retry: 2000\n\n"
    while True:
        yield f"data: {json.dumps(status.snapshot())}\n\n".encode()
        await asyncio.sleep(STREAM_EVERY_S)


def add_web(app: FastAPI, status: Status) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=NO_CACHE)

    @app.get("/status")
    async def status_json() -> dict[str, Any]:
        return status.snapshot()

    @app.get("/status/events")
    async def status_stream() -> StreamingResponse:
        return StreamingResponse(status_events(status), media_type="text/event-stream",
                                 headers={**NO_CACHE, "x-accel-buffering": "no"})
