"""The HTTP side: OpenAI-compatible routes, errors, streaming, metrics."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from halollm.generate import GenerationResult
from halollm.model.tokenizer import Tokenizer
from halollm.sampling import SamplingParams
from halollm.serve.engine import Engine, Job


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


def snapshot(stats: Callable[[], dict]) -> dict:
    """The cluster's statistics, read from the HTTP thread while the engine thread may be
    updating them: retried if a dictionary changed under the read."""
    for _ in range(5):
        try:
            return stats()
        except RuntimeError:
            continue
    return {}


class Metrics:
    def __init__(self, engine: Engine, cluster_stats: Callable[[], dict] | None) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("halo_requests", "Requests by route and status",
                                ["route", "status"], registry=r)
        self.tokens = Counter("halo_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("halo_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.token_latency = Histogram(
            "halo_token_latency_seconds", "Per-token decode latency", registry=r,
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.tokens_per_s = Gauge("halo_tokens_per_second",
                                  "Decode speed of the last request", registry=r)
        g = Gauge("halo_queue_waiting", "Requests waiting for the model", registry=r)
        g.set_function(lambda: engine.waiting)
        g = Gauge("halo_busy", "1 while a request is generating", registry=r)
        g.set_function(lambda: 1 if engine.busy else 0)
        g = Gauge("halo_requests_cancelled", "Requests cancelled by a disconnect", registry=r)
        g.set_function(lambda: engine.cancelled)
        if cluster_stats is not None:
            names = {"lost": "contributions lost", "received": "contributions received",
                     "late": "contributions late", "critical_waits":
                     "rounds with a critical contribution missing at the deadline",
                     "fallbacks": "critical contributions computed by the coordinator",
                     "repairs_served": "KV positions repaired", "rounds": "sync rounds"}
            for key, doc in names.items():
                g = Gauge(f"halo_sync_{key}", doc.capitalize(), registry=r)
                g.set_function(lambda k=key: snapshot(cluster_stats).get(k, 0))
            alive = Gauge("halo_worker_alive", "1 if the worker is alive", ["worker"],
                          registry=r)
            self._alive, self._cluster = alive, cluster_stats

    def observe(self, result: GenerationResult, seconds: float) -> None:
        self.tokens.inc(len(result.token_ids))
        self.prompt_tokens.inc(result.prompt_tokens)
        for s in result.step_s:
            self.token_latency.observe(s)
        if result.step_s:
            self.tokens_per_s.set(len(result.step_s) / sum(result.step_s))

    def render(self) -> bytes:
        if hasattr(self, "_cluster"):
            for w in snapshot(self._cluster).get("workers", []):
                self._alive.labels(worker=w["address"]).set(1 if w["alive"] else 0)
        return generate_latest(self.registry)


def create_app(engine: Engine, tokenizer: Tokenizer, model_id: str, max_position: int,
               api_key: str | None = None,
               cluster_stats: Callable[[], dict] | None = None) -> FastAPI:
    app = FastAPI(title="HALO", docs_url=None, redoc_url=None)
    metrics = Metrics(engine, cluster_stats)
    engine.on_result = metrics.observe
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # type: ignore[no-untyped-def]
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("invalid or missing API key",
                                               "authentication_error",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    def check_model(name: str) -> None:
        if name not in (model_id, "default"):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{model_id!r}", code="model_not_found", param="model")

    def make_job(req: Sampling, ids: list[int], loop: asyncio.AbstractEventLoop) -> Job:
        check_model(req.model)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        max_tokens = req.max_completion_tokens or req.max_tokens or 256
        if len(ids) >= max_position:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is "
                                f"{max_position} tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        return Job(prompt_ids=ids, max_tokens=max_tokens, sampling=sampling, stop=stop,
                   loop=loop)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", "model": model_id, "queue": engine.waiting,
                               "busy": engine.busy}
        if cluster_stats is not None:
            workers = snapshot(cluster_stats).get("workers", [])
            out["workers"] = {"alive": sum(w["alive"] for w in workers), "total": len(workers)}
        return out

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model",
                                            "created": created, "owned_by": "halo"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):  # type: ignore[no-untyped-def]
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content} for m in req.messages]
        ids = tokenizer.encode(tokenizer.render_chat(messages), add_bos=False)
        job = make_job(req, ids, asyncio.get_running_loop())
        return await respond(job, req, request, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):  # type: ignore
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "give exactly one prompt", param="prompt")
            prompt = prompt[0]
        job = make_job(req, tokenizer.encode(prompt), asyncio.get_running_loop())
        return await respond(job, req, request, chat=False)

    async def respond(job: Job, req: Sampling, request: Request, chat: bool):  # type: ignore
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        ahead = engine.submit(job)
        headers = {"x-halo-queue-ahead": str(ahead), "x-request-id": rid}
        route = request.url.path
        if req.stream:
            metrics.requests.labels(route, "200").inc()
            return StreamingResponse(stream(job, req, request, chat, rid),
                                     media_type="text/event-stream", headers=headers)
        text: list[str] = []
        while True:
            event = await next_event(job, request)
            if event is None:
                return JSONResponse({}, status_code=499)
            kind, value = event
            if kind == "text":
                text.append(value)
            elif kind == "error":
                raise ApiError(500 if value.startswith("internal") else 400, value,
                               "server_error" if value.startswith("internal")
                               else "invalid_request_error")
            else:
                break
        result: GenerationResult = value
        metrics.requests.labels(route, "200").inc()
        usage = _usage(result)
        if chat:
            body = {"id": rid, "object": "chat.completion", "created": int(time.time()),
                    "model": model_id, "choices": [{
                        "index": 0, "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason, "logprobs": None}],
                    "usage": usage}
        else:
            body = {"id": rid, "object": "text_completion", "created": int(time.time()),
                    "model": model_id, "choices": [{
                        "index": 0, "text": result.text, "finish_reason": result.finish_reason,
                        "logprobs": None}], "usage": usage}
        return JSONResponse(body, headers=headers)

    async def stream(job: Job, req: Sampling, request: Request, chat: bool,
                     rid: str) -> AsyncIterator[bytes]:
        created_at = int(time.time())

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                d: dict[str, Any] = {}
                if role:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish,
                                          "logprobs": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish,
                          "logprobs": None}
                obj = "text_completion"
            body = {"id": rid, "object": obj, "created": created_at, "model": model_id,
                    "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n".encode()

        try:
            if chat:
                yield chunk("", None, role=True)
            while True:
                event = await next_event(job, request)
                if event is None:
                    return
                kind, value = event
                if kind == "text":
                    yield chunk(value, None)
                elif kind == "error":
                    err = error_body(value, "server_error")
                    yield f"data: {json.dumps(err)}\n\n".encode()
                    return
                else:
                    result: GenerationResult = value
                    yield chunk(None, result.finish_reason)
                    if req.stream_options is not None and req.stream_options.include_usage:
                        body = {"id": rid, "object": "chat.completion.chunk" if chat else
                                "text_completion", "created": created_at, "model": model_id,
                                "choices": [], "usage": _usage(result)}
                        yield f"data: {json.dumps(body)}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            job.cancelled.set()  # a no-op once done; stops the generation if the client left

    return app


async def next_event(job: Job, request: Request) -> tuple[str, Any] | None:
    """The job's next event; None (and the job cancelled) once the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return None


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids)}
