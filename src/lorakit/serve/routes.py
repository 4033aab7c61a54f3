"""The HTTP routes, as FastAPI routers over the app's state (engine, limits, gate, metrics).

generation  POST /v1/completions, /v1/chat/completions, /v1/classify, /tokenize, /detokenize
info        GET /v1/models, /health, /metrics, /tokenizer_info; the page: GET /, /ui/adapters
admin       GET|POST /v1/adapters, DELETE /v1/adapters/{name}
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import protocol as P
from .engine import Engine
from .errors import EngineError, check_name
from .formats import ChatFormat, CompletionFormat, prepend, sse
from .jobs import Event, Job
from .page import adapter_cards, page

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
    if body.stream and (body.logprobs is not None or body.echo):
        raise EngineError("stream: not supported together with logprobs or echo; send stream: false")
    if body.max_tokens == 0 and not body.echo:
        raise EngineError("max_tokens: 0 scores the prompt and needs echo: true (else there is nothing to return)")
    adapter = _resolve(request, body.model)
    ids = [engine.encode_prompt(p) if isinstance(p, str) else list(p) for p in body.prompts()]
    limit = body.max_tokens if body.max_tokens is not None else request.app.state.limits.default_max_tokens
    jobs = engine.generation_jobs(ids, adapter, body.sampling(limit, body.logprobs, body.echo), n=body.n)
    return await _respond(request, jobs, body, CompletionFormat(body.model, engine.decode))


@generation.post("/v1/chat/completions")
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
    engine = _engine(request)
    if body.top_logprobs is not None and not body.logprobs:
        raise EngineError("top_logprobs: needs logprobs: true")
    if body.stream and body.logprobs:
        raise EngineError("stream: not supported together with logprobs; send stream: false")
    if (body.max_completion_tokens or body.max_tokens) == 0:
        raise EngineError("max_tokens: must be at least 1 for a chat completion")
    adapter = _resolve(request, body.model)
    ids = engine.encode_chat([m.as_dict() for m in body.messages])
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = body.sampling(body.max_completion_tokens or body.max_tokens, logprobs)
    jobs = engine.generation_jobs([ids], adapter, sampling, n=body.n)
    return await _respond(request, jobs, body, ChatFormat(body.model, engine.decode))


@generation.post("/tokenize")
def tokenize(body: P.TokenizeRequest, request: Request) -> dict:
    engine = _engine(request)
    if (body.prompt is None) == (body.messages is None):
        raise EngineError("give one of prompt or messages")
    if body.prompt is not None:
        tokens = engine.tokenize(body.prompt, body.add_special_tokens)
    else:
        tokens = engine.encode_chat([m.as_dict() for m in body.messages])
    return {"count": len(tokens), "max_model_len": engine.max_context, "tokens": tokens}


@generation.post("/detokenize")
def detokenize(body: P.DetokenizeRequest, request: Request) -> dict:
    engine = _engine(request)
    if not all(0 <= t < engine.vocab_size for t in body.tokens):
        raise EngineError(f"tokens: ids outside the vocabulary (0 to {engine.vocab_size - 1})")
    return {"prompt": engine.decode(body.tokens)}


@info.get("/", response_class=HTMLResponse, include_in_schema=False)
def home() -> HTMLResponse:
    return HTMLResponse(page())


@info.get("/ui/adapters")
def ui_adapters(request: Request) -> dict:
    return adapter_cards(_engine(request))


@info.get("/tokenizer_info")
def tokenizer_info(request: Request) -> dict:
    return _engine(request).tokenizer_info()


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
