"""What the HTTP side keeps around the routes: OpenAI-shaped error bodies, the concurrency
gate, Prometheus metrics, the body-size limit and the request observer (ASGI middleware)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException

from . import protocol as P
from .errors import TooMany
from .jobs import EngineEvents

ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/classify",
    "/v1/models",
    "/v1/adapters",
    "/health",
    "/metrics",
)


def error_response(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    detail = P.ErrorDetail(message=message, type=kind, code=status, **extra)
    return JSONResponse(P.ErrorResponse(error=detail).model_dump(exclude_none=True), status_code=status)


def describe_validation(errors: list[dict]) -> str:
    """A validation failure in one line: malformed JSON, or each bad field and why."""
    for e in errors:
        if e["type"] == "json_invalid":
            return f"malformed JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', e['msg'])}"
    return "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)


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

    def __init__(self, engine) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorakit_requests",
            "HTTP requests by endpoint, model (adapter) and status",
            ["endpoint", "adapter", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "lorakit_request_seconds",
            "Request latency; streams until their last byte",
            ["endpoint"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter("lorakit_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.batch = Histogram(
            "lorakit_batch_rows",
            "Rows per forward pass (prefill, decode, classify)",
            ["kind"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.evictions = Counter(
            "lorakit_adapter_evictions", "Adapters evicted from memory (LRU)", ["adapter"], registry=r
        )
        self.in_flight = Gauge(
            "lorakit_requests_in_flight", "Generation/classification requests in progress", registry=r
        )
        for key, help_ in (
            ("adapters_loaded", "Adapters held in the model"),
            ("adapters_known", "Adapters known (loaded or on disk)"),
            ("waiting", "Rows waiting for a batch"),
            ("running", "Rows in the running batch"),
        ):
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
            return await error_response(413, "request_too_large", _TooLarge(self.limit).detail)(scope, receive, send)
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
