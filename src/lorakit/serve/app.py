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
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import protocol as P
from . import routes
from .engine import Engine
from .errors import EngineError
from .middleware import BodyLimit, Gate, Metrics, Observe, describe_validation, error_response


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    max_concurrent: int = 64  # generation/classification requests at once; more: 429
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)


def create_app(engine: Engine, limits: Limits | None = None, *, admin: bool = True) -> FastAPI:
    """A FastAPI app serving `engine`; its lifespan starts and stops the engine. `admin=False`
    leaves out the adapter load/unload endpoints."""
    limits = limits or Limits()
    metrics = Metrics(engine)
    engine.events = metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(engine.start)  # loads the adapters dir: blocking work
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    state = app.state
    state.engine, state.limits, state.metrics, state.started = engine, limits, metrics, P.now()
    state.gate = Gate(limits.max_concurrent, metrics.in_flight)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(Observe, metrics=metrics)  # outermost: sees every status, 413 included
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    for router in (routes.generation, routes.info, *([routes.admin] if admin else [])):
        app.include_router(router)
    return app


async def _engine_error(request: Request, e: EngineError) -> JSONResponse:
    return error_response(e.status, e.kind, e.message, **e.extra)


async def _invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(400, "invalid_request_error", describe_validation(e.errors()))


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "request_too_large" if e.status_code == 413 else "invalid_request_error"
    return error_response(e.status_code, kind, str(e.detail))


def serve(
    model: str,
    adapters_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: str | None = None,
    task: str | None = None,
    config=None,
    limits: Limits | None = None,
    admin: bool = True,
    log_level: str = "info",
    quantize: str | None = None,
    bf16: bool = False,
) -> None:
    """Load the model and run the server until interrupted (what `lorakit serve` does)."""
    import uvicorn

    engine = Engine.from_pretrained(model, adapters_dir, task=task, served_name=served_name, config=config,
                                    quantize=quantize, bf16=bf16)  # fmt: skip
    uvicorn.run(create_app(engine, limits, admin=admin), host=host, port=port, log_level=log_level)
