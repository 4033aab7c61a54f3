"""The HTTP front of `lorakit serve`: OpenAI-compatible endpoints over an `Engine`.

    POST /v1/completions, /v1/chat/completions   `model` names the adapter (the base model's
                                                 name: no adapter); `stream: true` for SSE
    POST /v1/classify                            classification adapters: label + scores
    GET  /v1/models                              the base model and every adapter
    GET|POST /v1/adapters, DELETE /v1/adapters/{name}   list, load or replace, unload
    GET  /health, /metrics                       liveness; Prometheus metrics

Errors are OpenAI-shaped ({"error": {"message", "type", "code"}}): 400 bad request or
malformed JSON, 403 a path outside the adapters dir, 404 unknown model (with the known
ones), 413 body too large, 422 an adapter that does not fit the base, 429 too many requests
at once, 503 busy, 504 timeout.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from . import protocol as P
from .engine import Engine, EngineError, EngineEvents, Event, Job, check_name

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/v1/adapters",
             "/health", "/metrics")


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20     # larger request bodies: 413
    max_concurrent: int = 64          # generation/classification requests at once; more: 429
    default_max_tokens: int = 16      # /v1/completions without max_tokens (OpenAI's default)


class TooMany(EngineError):
    status, kind = 429, "rate_limit_error"


class Gate:
    """Counts requests in progress and turns away those past the limit (event loop only)."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit, self.active, self.gauge = limit, 0, gauge

    def enter(self) -> None:
        if self.active >= self.limit:
            raise TooMany(f"too many requests in progress (limit {self.limit}); retry shortly")
        self.active += 1
        self.gauge.set(self.active)

    def leave(self) -> None:
        self.active -= 1
        self.gauge.set(self.active)


class Metrics(EngineEvents):
    """Prometheus metrics, in a registry of their own (several apps can live in one process)."""

    def __init__(self, engine: Engine) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "HTTP requests by endpoint, model (adapter) and status",
                                ["endpoint", "adapter", "status"], registry=r)
        self.latency = Histogram("lorakit_request_seconds", "Request latency; streams until their last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("lorakit_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.batch = Histogram("lorakit_batch_rows", "Rows per forward pass (prefill, decode, classify)",
                               ["kind"], registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.evictions = Counter("lorakit_adapter_evictions", "Adapters evicted from memory (LRU)",
                                 ["adapter"], registry=r)
        self.in_flight = Gauge("lorakit_requests_in_flight", "Generation/classification requests in progress",
                               registry=r)
        for key, help_ in (("adapters_loaded", "Adapters held in the model"),
                           ("adapters_known", "Adapters known (loaded or on disk)"),
                           ("waiting", "Rows waiting for a batch"), ("running", "Rows in the running batch")):
            Gauge(f"lorakit_{key}", help_, registry=r).set_function(lambda key=key: engine.stats()[key])

    def on_batch(self, kind: str, rows: int) -> None:
        self.batch.labels(kind).observe(rows)

    def on_evict(self, name: str) -> None:
        self.evictions.labels(name).inc()

    def observe(self, path: str, adapter: str, status: int, seconds: float) -> None:
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        self.requests.labels(endpoint, adapter, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)


# -- ASGI middleware -------------------------------------------------------------------------
class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimit:
    """413 for bodies over the limit: at once from Content-Length, else while reading a
    chunked body (FastAPI passes HTTPExceptions raised mid-read through)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await _error(413, "request_too_large", _TooLarge(self.limit).detail)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class Observe:
    """Counts every request (endpoint, adapter, status) and times it to its last byte."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def watched(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            adapter = scope.get("state", {}).get("adapter", "-")
            self.metrics.observe(scope["path"], adapter, status, time.perf_counter() - start)


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    detail = P.ErrorDetail(message=message, type=kind, code=status, **extra)
    return JSONResponse(P.ErrorResponse(error=detail).model_dump(exclude_none=True), status_code=status)


def _describe(errors: list[dict]) -> str:
    """A validation failure in one line: malformed JSON, or each bad field and why."""
    for e in errors:
        if e["type"] == "json_invalid":
            return f"malformed JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', e['msg'])}"
    return "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)


# -- response formats ------------------------------------------------------------------------
class _Format:
    """How a finished request and its stream chunks look for one endpoint."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, P.new_id(self.prefix), P.now()

    prefix = "cmpl"

    def usage(self, finals: list[Event]) -> P.Usage:
        prompt = sum(e.prompt_tokens for e in finals)
        completion = sum(e.completion_tokens for e in finals)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def response(self, finals: list[Event]) -> Any:
        choices = [P.CompletionChoice(index=e.index, text=e.text, finish_reason=e.finish_reason) for e in finals]
        return P.Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage(finals))

    def chunk(self, event: Event, first: bool) -> Any:
        choice = P.CompletionChoice(index=event.index, text=event.delta, finish_reason=event.finish_reason)
        return P.Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, finals: list[Event]) -> Any:
        return P.Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage(finals))


class _ChatFormat(_Format):
    prefix = "chatcmpl"

    def response(self, finals: list[Event]) -> Any:
        choices = [P.ChatChoice(index=e.index, message=P.AssistantMessage(content=e.text), finish_reason=e.finish_reason)
                   for e in finals]
        return P.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices,
                                usage=self.usage(finals))

    def chunk(self, event: Event, first: bool) -> Any:
        delta = P.Delta(role="assistant" if first else None, content=event.delta)
        choice = P.ChunkChoice(index=event.index, delta=delta, finish_reason=event.finish_reason)
        return P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, finals: list[Event]) -> Any:
        return P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                     usage=self.usage(finals))


def _sse(payload: Any) -> str:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


# -- the app ---------------------------------------------------------------------------------
def create_app(engine: Engine, limits: Limits | None = None, *, admin: bool = True) -> FastAPI:
    """A FastAPI app serving `engine`; its lifespan starts and stops the engine. `admin=False`
    leaves out the adapter load/unload endpoints."""
    limits = limits or Limits()
    metrics = Metrics(engine)
    engine.events = metrics
    gate = Gate(limits.max_concurrent, metrics.in_flight)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(engine.start)     # loads the adapters dir: blocking work
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.state.engine, app.state.limits, app.state.gate, app.state.metrics = engine, limits, gate, metrics
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(Observe, metrics=metrics)   # outermost: sees every status, 413 included

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError) -> JSONResponse:
        return _error(e.status, e.kind, e.message, **e.extra)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, "invalid_request_error", _describe(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "request_too_large" if e.status_code == 413 else "invalid_request_error"
        return _error(e.status_code, kind, str(e.detail))

    def resolve(request: Request, model: str) -> str | None:
        """The adapter `model` names (None: the base); labels the request for the metrics."""
        request.state.adapter = "unknown"
        adapter = engine.resolve(model)
        request.state.adapter = model
        return adapter

    async def finals_of(events: AsyncIterator[Event], model: str) -> list[Event]:
        """Each job's final event; the first error is raised (closing the stream cancels the rest)."""
        finals = {}
        async with contextlib.aclosing(events):
            async for event in events:
                if event.error is not None:
                    raise event.error
                if event.final:
                    finals[event.index] = event
                    metrics.tokens.labels(model).inc(event.completion_tokens)
        return [finals[i] for i in sorted(finals)]

    async def stream(events: AsyncIterator[Event], fmt: _Format, usage: bool, model: str) -> AsyncIterator[str]:
        """SSE chunks as tokens arrive. An error before the first chunk is raised (a proper
        HTTP status); later, it is sent as an error event and the stream ends."""
        started, finals = set(), []
        try:
            async for event in events:
                if event.error is not None:
                    if not started:
                        raise event.error
                    e = event.error
                    yield _sse(P.ErrorResponse(error=P.ErrorDetail(message=e.message, type=e.kind, code=e.status)))
                    break
                if event.delta or event.final or event.index not in started:
                    yield _sse(fmt.chunk(event, first=event.index not in started))
                    started.add(event.index)
                if event.final:
                    finals.append(event)
                    metrics.tokens.labels(model).inc(event.completion_tokens)
            else:
                if usage:
                    yield _sse(fmt.usage_chunk(finals))
            yield "data: [DONE]\n\n"
        finally:
            gate.leave()
            await events.aclose()

    async def respond(jobs: list[Job], body: P.GenerationRequest, fmt: _Format) -> Response:
        """The whole answer as JSON, or server-sent events as tokens come (`stream: true`)."""
        gate.enter()
        events = engine.stream(jobs)
        if not body.stream:
            try:
                return JSONResponse(fmt.response(await finals_of(events, body.model)).model_dump())
            finally:
                gate.leave()
        chunks = stream(events, fmt, body.include_usage, body.model)   # leaves the gate when done
        first = await anext(chunks)
        return StreamingResponse(_prepend(first, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        adapter = resolve(request, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [engine.encode_prompt(p) for p in prompts]
        jobs = engine.generation_jobs(ids, adapter, body.sampling(body.max_tokens or limits.default_max_tokens))
        return await respond(jobs, body, _Format(body.model))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        adapter = resolve(request, body.model)
        ids = engine.encode_chat([m.as_dict() for m in body.messages])
        jobs = engine.generation_jobs([ids], adapter, body.sampling(body.max_completion_tokens or body.max_tokens))
        return await respond(jobs, body, _ChatFormat(body.model))

    @app.post("/v1/classify")
    async def classify(body: P.ClassifyRequest, request: Request) -> P.ClassifyResponse:
        adapter = resolve(request, body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        jobs = engine.classification_jobs(texts, adapter)
        gate.enter()
        try:
            finals = await finals_of(engine.stream(jobs), body.model)
        finally:
            gate.leave()
        return P.ClassifyResponse(model=body.model, data=[P.Classification(index=e.index, **e.result) for e in finals])

    started = P.now()

    @app.get("/v1/models")
    def models() -> P.ModelList:
        cards = [P.ModelCard(id=engine.name, created=started, root=engine.name)]
        cards += [P.ModelCard(id=a["name"], created=started, root=a["path"], parent=engine.name)
                  for a in engine.adapters()]
        return P.ModelList(data=cards)

    @app.get("/health")
    def health() -> JSONResponse:
        status = "ok" if engine.alive else "down"
        return JSONResponse({"status": status, "model": engine.name, "task": engine.task, **engine.stats()},
                            status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if admin:
        _add_admin(app, engine)
    return app


def _add_admin(app: FastAPI, engine: Engine) -> None:
    """Adapter administration. The handlers are plain functions: FastAPI runs them in a
    thread, where they wait for the worker to load or unload between two batches."""

    @app.get("/v1/adapters")
    def list_adapters() -> dict:
        return {"object": "list", "data": engine.adapters(), "loaded": engine.loaded_names(),
                "max_adapters": engine.config.max_adapters}

    @app.post("/v1/adapters", status_code=201)
    def load_adapter(body: P.AdapterLoadRequest) -> dict:
        replaced = engine.load(body.name, body.path)
        return {"name": body.name, "loaded": True, "replaced": replaced}

    @app.delete("/v1/adapters/{name}")
    def unload_adapter(name: str) -> dict:
        engine.unload(check_name(name))
        return {"name": name, "deleted": True}


def serve(model: str, adapters_dir: str, *, host: str = "127.0.0.1", port: int = 8000,
          served_name: str | None = None, task: str | None = None, config=None, limits: Limits | None = None,
          admin: bool = True, log_level: str = "info") -> None:
    """Load the model and run the server until interrupted (what `lorakit serve` does)."""
    import uvicorn
    engine = Engine.from_pretrained(model, adapters_dir, task=task, served_name=served_name, config=config)
    uvicorn.run(create_app(engine, limits, admin=admin), host=host, port=port, log_level=log_level)
