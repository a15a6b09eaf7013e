"""Turning a job's events into OpenAI responses: one JSON body, or server-sent events.

Both race the generation against the client: a non-streaming request waits on the
connection's own receive() (as vLLM does) next to the job, so a client that hangs up
cancels its job at once even while tokens keep arriving; a stream is cancelled when the
response can no longer be written.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from halollm.generate import GenerationResult
from halollm.serve.engine import Job
from halollm.serve.schemas import ApiError, error_body


@dataclass
class Reply:
    """Who answers whom: the response id, the model id, chat or plain completion."""

    rid: str
    model_id: str
    chat: bool
    include_usage: bool = False

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def body(self, result: GenerationResult) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": result.text}}
        else:
            choice = {"index": 0, "text": result.text}
        choice.update(finish_reason=result.finish_reason, logprobs=None)
        return {"id": self.rid, "object": "chat.completion" if self.chat else
                "text_completion", "created": int(time.time()), "model": self.model_id,
                "choices": [choice], "usage": usage(result)}

    def chunk(self, created: int, delta: str | None, finish: str | None,
              role: bool = False) -> bytes:
        if self.chat:
            d: dict[str, Any] = {"role": "assistant"} if role else {}
            if delta is not None:
                d["content"] = delta
            choice: dict[str, Any] = {"index": 0, "delta": d}
        else:
            choice = {"index": 0, "text": delta or ""}
        choice.update(finish_reason=finish, logprobs=None)
        return sse({"id": self.rid, "object": self.chunk_object, "created": created,
                    "model": self.model_id, "choices": [choice]})


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids)}


async def _hung_up(request: Request) -> None:
    """Returns once the client has disconnected (the body has been read already, so the
    connection's next message can only be the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(job: Job, request: Request) -> GenerationResult | None:
    """The job's result; None (and the job cancelled) if the client hangs up first.
    Raises ApiError if the generation failed."""
    gone = asyncio.ensure_future(_hung_up(request))
    try:
        while True:
            event = asyncio.ensure_future(job.events.get())
            await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                job.cancelled.set()
                return None
            kind, value = event.result()
            if kind == "done":
                return value
            if kind == "error":
                internal = value.startswith("internal")
                raise ApiError(500 if internal else 400, value,
                               "server_error" if internal else "invalid_request_error")
    finally:
        gone.cancel()


async def stream(job: Job, reply: Reply) -> AsyncIterator[bytes]:
    """Server-sent events of a job; closing the generator (the client left) cancels it."""
    created = int(time.time())
    try:
        if reply.chat:
            yield reply.chunk(created, "", None, role=True)
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield reply.chunk(created, value, None)
            elif kind == "error":
                yield sse(error_body(value, "server_error"))
                return
            else:
                yield reply.chunk(created, None, value.finish_reason)
                if reply.include_usage:
                    yield sse({"id": reply.rid, "object": reply.chunk_object,
                               "created": created, "model": reply.model_id, "choices": [],
                               "usage": usage(value)})
                yield b"data: [DONE]\n\n"
                return
    finally:
        job.cancelled.set()  # a no-op once done; stops the generation if the client left
