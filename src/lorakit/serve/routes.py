"""The HTTP routes, as FastAPI routers over the app's state (engine, limits, gate, metrics).

generation  POST /v1/completions, /v1/chat/completions, /v1/classify
info        GET /v1/models, /health, /metrics
admin       GET|POST /v1/adapters, DELETE /v1/adapters/{name}
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import protocol as P
from .engine import Engine
from .errors import check_name
from .formats import ChatFormat, CompletionFormat, prepend, sse
from .jobs import Event, Job

generation = APIRouter()
info = APIRouter()
admin = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _resolve(request: Request, model: str) -> str | None:
    """The adapter `model` names (None: the base); labels the request for the metrics."""
    request.state.adapter = "unknown"
    adapter = _engine(request).resolve(model)
    request.state.adapter = model
    return adapter


async def _finals(request: Request, events: AsyncIterator[Event], model: str) -> list[Event]:
    """Each job's final event; the first error is raised (closing the stream cancels the rest)."""
    finals = {}
    async with contextlib.aclosing(events):
        async for event in events:
            if event.error is not None:
                raise event.error
            if event.final:
                finals[event.index] = event
                request.app.state.metrics.tokens.labels(model).inc(event.completion_tokens)
    return [finals[i] for i in sorted(finals)]


async def _stream(
    request: Request, events: AsyncIterator[Event], fmt: CompletionFormat, usage: bool, model: str
) -> AsyncIterator[str]:
    """SSE chunks as tokens arrive. An error before the first chunk is raised (a proper
    HTTP status); later, it is sent as an error event and the stream ends."""
    started, finals = set(), []
    try:
        async for event in events:
            if event.error is not None:
                if not started:
                    raise event.error
                e = event.error
                yield sse(P.ErrorResponse(error=P.ErrorDetail(message=e.message, type=e.kind, code=e.status)))
                break
            if event.delta or event.final or event.index not in started:
                yield sse(fmt.chunk(event, first=event.index not in started))
                started.add(event.index)
            if event.final:
                finals.append(event)
                request.app.state.metrics.tokens.labels(model).inc(event.completion_tokens)
        else:
            if usage:
                yield sse(fmt.usage_chunk(finals))
        yield "data: [DONE]\n\n"
    finally:
        request.app.state.gate.leave()
        await events.aclose()


async def _respond(request: Request, jobs: list[Job], body: P.GenerationRequest, fmt: CompletionFormat) -> Response:
    """The whole answer as JSON, or server-sent events as tokens come (`stream: true`)."""
    gate = request.app.state.gate
    gate.enter()
    events = _engine(request).stream(jobs)
    if not body.stream:
        try:
            return JSONResponse(fmt.response(await _finals(request, events, body.model)).model_dump())
        finally:
            gate.leave()
    chunks = _stream(request, events, fmt, body.include_usage, body.model)  # leaves the gate when done
    first = await anext(chunks)
    return StreamingResponse(
        prepend(first, chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@generation.post("/v1/completions")
async def completions(body: P.CompletionRequest, request: Request) -> Response:
    engine = _engine(request)
    adapter = _resolve(request, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    ids = [engine.encode_prompt(p) for p in prompts]
    sampling = body.sampling(body.max_tokens or request.app.state.limits.default_max_tokens)
    return await _respond(request, engine.generation_jobs(ids, adapter, sampling), body, CompletionFormat(body.model))


@generation.post("/v1/chat/completions")
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
    engine = _engine(request)
    adapter = _resolve(request, body.model)
    ids = engine.encode_chat([m.as_dict() for m in body.messages])
    jobs = engine.generation_jobs([ids], adapter, body.sampling(body.max_completion_tokens or body.max_tokens))
    return await _respond(request, jobs, body, ChatFormat(body.model))


@generation.post("/v1/classify")
async def classify(body: P.ClassifyRequest, request: Request) -> P.ClassifyResponse:
    engine = _engine(request)
    adapter = _resolve(request, body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    jobs = engine.classification_jobs(texts, adapter)
    gate = request.app.state.gate
    gate.enter()
    try:
        finals = await _finals(request, engine.stream(jobs), body.model)
    finally:
        gate.leave()
    return P.ClassifyResponse(model=body.model, data=[P.Classification(index=e.index, **e.result) for e in finals])


@info.get("/v1/models")
def models(request: Request) -> P.ModelList:
    engine, started = _engine(request), request.app.state.started
    cards = [P.ModelCard(id=engine.name, created=started, root=engine.name)]
    cards += [P.ModelCard(id=a["name"], created=started, root=a["path"], parent=engine.name) for a in engine.adapters()]
    return P.ModelList(data=cards)


@info.get("/health")
def health(request: Request) -> JSONResponse:
    engine = _engine(request)
    status = "ok" if engine.alive else "down"
    return JSONResponse(
        {"status": status, "model": engine.name, "task": engine.task, **engine.stats()},
        status_code=200 if engine.alive else 503,
    )


@info.get("/metrics")
def prometheus(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# Adapter administration. The handlers are plain functions: FastAPI runs them in a thread,
# where they wait for the worker to load or unload between two batches.
@admin.get("/v1/adapters")
def list_adapters(request: Request) -> dict:
    engine = _engine(request)
    return {
        "object": "list",
        "data": engine.adapters(),
        "loaded": engine.loaded_names(),
        "max_adapters": engine.config.max_adapters,
    }


@admin.post("/v1/adapters", status_code=201)
def load_adapter(body: P.AdapterLoadRequest, request: Request) -> dict:
    replaced = _engine(request).load(body.name, body.path)
    return {"name": body.name, "loaded": True, "replaced": replaced}


@admin.delete("/v1/adapters/{name}")
def unload_adapter(name: str, request: Request) -> dict:
    _engine(request).unload(check_name(name))
    return {"name": name, "deleted": True}
