"""Serve many adapters on one frozen base model: `lorakit serve`.

    from lorakit.serve import Engine, create_app
    engine = Engine.from_pretrained("smollm2-135m", "adapters/")   # each subdirectory: one adapter
    app = create_app(engine)                                         # FastAPI; run with uvicorn

`engine` batches requests for different adapters into one forward pass (`mixed_batch`),
step by step, and works without HTTP too (`with engine: engine.generate(...)`).
"""
from .engine import (AdapterRefused, Busy, Engine, EngineConfig, EngineError, Event, Forbidden, Sampling,
                     Timeout, UnknownAdapter)

__all__ = ["AdapterRefused", "Busy", "Engine", "EngineConfig", "EngineError", "Event", "Forbidden", "Limits",
           "Sampling", "Timeout", "UnknownAdapter", "create_app", "serve"]


def __getattr__(name: str):
    # The HTTP side needs fastapi and prometheus_client; import it only when asked for.
    if name in ("create_app", "serve", "Limits"):
        from . import app
        return getattr(app, name)
    raise AttributeError(name)
