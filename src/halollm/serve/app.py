"""The HTTP side: OpenAI-compatible routes, errors, streaming, metrics.

Limits, in the order a request meets them: the API key and the body size (guard.py: 401,
413), the JSON and every number in it (schemas.py: 400), the model name (404), the queue
(429 when --max-queue requests already wait), then the prompt: too many characters to fit
the context is refused without tokenizing, and tokenizing (the chat template included)
runs in a worker thread, never on the event loop, so /health answers during a huge prompt.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from halollm.errors import HaloError
from halollm.generate import GenerationResult
from halollm.model.tokenizer import Tokenizer
from halollm.sampling import SamplingParams
from halollm.serve.engine import Engine, Job, QueueFull
from halollm.serve.guard import DEFAULT_MAX_BODY, Guard
from halollm.serve.metrics import Metrics, snapshot
from halollm.serve.replies import Reply, collect, stream
from halollm.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    error_body,
)
from halollm.serve.status import Status
from halollm.serve.web import add_web

__all__ = ["ApiError", "create_app", "error_body"]


class Server:
    """What the routes share: the engine, the tokenizer and the limits."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_id: str,
                 max_position: int, cluster_stats: Callable[[], dict] | None,
                 device: Callable[[], dict] | None = None) -> None:
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self.max_position, self.cluster_stats = max_position, cluster_stats
        self.metrics = Metrics(engine, cluster_stats)
        self.status = Status(engine, model_id, cluster_stats, device)
        engine.on_result = self._on_result
        engine.on_step = self.status.on_step
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="halo-tokenize")
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        # no token covers more characters than its own string has
        self.max_prompt_chars = max_position * max((len(t) for t in vocab), default=1)

    def _on_result(self, result: GenerationResult, seconds: float) -> None:
        self.metrics.observe(result, seconds)
        self.status.on_result(result, seconds)

    def check_model(self, name: str) -> None:
        if name not in (self.model_id, "default"):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_id!r}", code="model_not_found", param="model")

    def check_admission(self, req: Sampling, chars: int) -> None:
        """Everything decidable before tokenizing: the model, the budget, the queue, and a
        prompt with more characters than could fit the context."""
        self.check_model(req.model)
        if req.token_budget > self.max_position:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{param} is {req.token_budget}; this model's context is "
                                f"{self.max_position} tokens", param=param)
        if self.engine.full:
            raise self.queue_full()
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"the prompt has {chars} characters, more than this model's "
                                f"context of {self.max_position} tokens can hold",
                           code="context_length_exceeded")

    def queue_full(self) -> ApiError:
        return ApiError(429, f"the server is busy: {self.engine.waiting} requests are waiting "
                             f"(at most {self.engine.max_queue}); retry later",
                        "rate_limit_error", code="queue_full", headers={"retry-after": "1"})

    async def tokenize(self, fn: Callable[[], list[int]]) -> list[int]:
        """Run a tokenization off the event loop; a template error is a 400."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn)
        except HaloError as exc:
            raise ApiError(400, str(exc)) from exc

    def make_job(self, req: Sampling, ids: list[int]) -> Job:
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) >= self.max_position:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is "
                                f"{self.max_position} tokens", code="context_length_exceeded")
        try:
            sampling = SamplingParams(temperature=req.temperature, top_k=req.top_k,
                                      top_p=req.top_p, seed=req.seed,
                                      repetition_penalty=req.repetition_penalty)
        except HaloError as exc:
            raise ApiError(400, str(exc)) from exc
        return Job(prompt_ids=ids, max_tokens=req.token_budget, sampling=sampling,
                   stop=req.stops, loop=asyncio.get_running_loop(),
                   ignore_eos=req.ignore_eos)

    async def respond(self, job: Job, req: Sampling, request: Request, chat: bool) -> Any:
        reply = Reply(("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                      self.model_id, chat, req.stream_options is not None
                      and req.stream_options.include_usage)
        try:
            ahead = self.engine.submit(job)
        except QueueFull:
            raise self.queue_full() from None
        headers = {"x-halo-queue-ahead": str(ahead), "x-request-id": reply.rid}
        route = request.url.path
        if req.stream:
            self.metrics.count(route, 200)
            return StreamingResponse(stream(job, reply), media_type="text/event-stream",
                                     headers=headers)
        result = await collect(job, request)
        if result is None:
            return JSONResponse({}, status_code=499)
        self.metrics.count(route, 200)
        return JSONResponse(reply.body(result), headers=headers)

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", "model": self.model_id,
                               "queue": self.engine.waiting, "busy": self.engine.busy,
                               "max_queue": self.engine.max_queue}
        if self.cluster_stats is not None:
            workers = snapshot(self.cluster_stats).get("workers", [])
            alive = sum(w["alive"] for w in workers)
            out["workers"] = {"alive": alive, "total": len(workers)}
            if alive < len(workers):  # still answering: the coordinator took their groups
                out["status"] = "degraded"
        return out


def _add_error_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        server.metrics.count(request.url.path, exc.status)
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        server.metrics.count(request.url.path, 400)
        return JSONResponse(error_body(msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"),
                            status_code=exc.status_code)


def _add_routes(app: FastAPI, server: Server) -> None:
    tok = server.tokenizer

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return server.health()

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_id, "object": "model",
                                            "created": server.created, "owned_by": "halo"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):  # type: ignore[no-untyped-def]
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content} for m in req.messages]
        server.check_admission(req, sum(len(m["content"]) for m in messages))
        ids = await server.tokenize(lambda: tok.encode(tok.render_chat(messages),
                                                       add_bos=False))
        return await server.respond(server.make_job(req, ids), req, request, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):  # type: ignore
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "give exactly one prompt", param="prompt")
            prompt = prompt[0]
        server.check_admission(req, len(prompt))
        ids = await server.tokenize(lambda: tok.encode(prompt))
        return await server.respond(server.make_job(req, ids), req, request, chat=False)


def create_app(engine: Engine, tokenizer: Tokenizer, model_id: str, max_position: int,
               api_key: str | None = None,
               cluster_stats: Callable[[], dict] | None = None,
               max_body: int = DEFAULT_MAX_BODY,
               device: Callable[[], dict] | None = None) -> FastAPI:
    """The app; `cluster_stats` is the coordinator's report (None: this device only),
    `device` this device's measured profile (speed, memory) for the web page."""
    app = FastAPI(title="HALO", docs_url=None, redoc_url=None)
    server = Server(engine, tokenizer, model_id, max_position, cluster_stats, device)
    _add_error_handlers(app, server)
    _add_routes(app, server)
    add_web(app, server.status)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, count=server.metrics.count)
    app.state.server = server
    return app
