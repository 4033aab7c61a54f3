"""What the engine works on: its settings, a request's sampling, one row of work (`Job`) and
what a request hears back (`Event`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import EngineError

log = logging.getLogger("lorakit.serve")


@dataclass
class EngineConfig:
    max_adapters: int = 8  # adapters held in the model at once (LRU eviction beyond)
    max_batch_size: int = 32  # rows in one forward pass
    max_tokens: int = 512  # cap on a request's max_tokens
    request_timeout_s: float = 120.0
    mixed: bool = True  # False: one adapter per batch (the baseline to beat)
    watch_interval_s: float = 2.0  # poll the adapters dir this often; 0: no watch
    allow_any_path: bool = False  # admin loads may point outside the adapters dir

    def __post_init__(self) -> None:
        for key in ("max_adapters", "max_batch_size", "max_tokens"):
            if getattr(self, key) < 1:
                raise EngineError(f"{key} must be at least 1, not {getattr(self, key)}")


@dataclass
class Sampling:
    max_tokens: int | None = None  # None: as many as the cap and the context allow
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely at its place
    echo: bool = False  # the prompt comes back first (with logprobs: each prompt token scored)

    def replace(self, **changes: Any) -> Sampling:
        return dataclasses.replace(self, **changes)


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (None for a prompt's first token: nothing
    predicts it) and the `k` most likely tokens at its position, {token id: logprob}."""

    token: int
    logprob: float | None
    top: dict[int, float]


@dataclass
class Event:
    """What a request hears from the worker: new text, then one final event (finish_reason,
    or error; classification: result)."""

    index: int
    delta: str = ""
    finish_reason: str | None = None
    text: str = ""  # the whole text, on the final event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: EngineError | None = None
    result: dict | None = None
    logprobs: list[TokenLogprob] | None = None  # on the final event: (echoed prompt +) completion
    prompt_ids: list[int] | None = None  # on the final event of an echo request

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class Job:
    """One row of work: a prompt to continue, or a text to classify."""

    adapter: str | None
    index: int = 0
    emit: Callable[[Event], None] = lambda event: None
    deadline: float = float("inf")
    prompt_ids: list[int] = field(default_factory=list)
    text: str = ""  # classification input
    sampling: Sampling = field(default_factory=Sampling)
    tokens: list[int] = field(default_factory=list)
    output: str = ""
    sent: int = 0  # characters of `output` already emitted
    slot: Any = None  # the registry's Slot this job holds while it runs
    bound: bool = False  # holds its slot (or needs none: the base)
    cancelled: bool = False
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # echoed prompt's, then each kept token's
    pending: TokenLogprob | None = None  # the token just chosen, kept if it joins the output

    def send(self, event: Event) -> None:
        """Hand `event` to the listener; a listener that fails must not take the worker down."""
        try:
            self.emit(event)
        except Exception:
            log.exception("a request's event listener failed")

    def fail(self, error: EngineError) -> None:
        self.send(Event(self.index, error=error))


class EngineEvents:
    """Hooks for metrics; the defaults do nothing. Called on the worker thread."""

    def on_batch(self, kind: str, rows: int) -> None: ...

    def on_evict(self, name: str) -> None: ...
