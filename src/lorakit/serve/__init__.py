"""Serve many adapters on one frozen base model: `lorakit serve`.

    from lorakit.serve import Engine, create_app
    engine = Engine.from_pretrained("smollm2-135m", "adapters/")   # each subdirectory: one adapter
    app = create_app(engine)                                         # FastAPI; run with uvicorn

`engine` batches requests for different adapters into one forward pass (`mixed_batch`),
step by step, and works without HTTP too (`with engine: engine.generate(...)`).

    errors.py    the errors and the HTTP statuses they map to
    jobs.py      settings, sampling, a row of work, the events a request hears
    registry.py  adapters known and loaded: load, replace, LRU eviction, the directory watch
    batch.py     the running batch and its KV cache: prefill, splice, decode
    sampling.py  next tokens (greedy, temperature, top-p) and stop strings
    engine.py    the scheduler: one worker thread, continuous batching
    app.py       the FastAPI app (routes.py, formats.py, middleware.py, protocol.py)
"""

from .engine import Engine
from .errors import AdapterRefused, Busy, EngineError, Forbidden, Timeout, UnknownAdapter
from .jobs import EngineConfig, Event, Sampling

__all__ = [
    "AdapterRefused",
    "Busy",
    "Engine",
    "EngineConfig",
    "EngineError",
    "Event",
    "Forbidden",
    "Limits",
    "Sampling",
    "Timeout",
    "UnknownAdapter",
    "create_app",
    "serve",
]


def __getattr__(name: str):
    # The HTTP side needs fastapi and prometheus_client; import it only when asked for.
    if name in ("create_app", "serve", "Limits"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
