"""The server's errors: each carries the HTTP status and OpenAI error type it maps to."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class EngineError(ValueError):
    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class UnknownAdapter(EngineError):
    status, kind = 404, "not_found_error"

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown model {name!r}; this server knows: {', '.join(known)}", known=list(known))


class AdapterRefused(EngineError):
    """The adapter does not fit the base model (architecture, shapes, files)."""

    status, kind = 422, "adapter_load_error"


class Forbidden(EngineError):
    status, kind = 403, "permission_error"


class Busy(EngineError):
    status, kind = 503, "server_busy"


class Timeout(EngineError):
    status, kind = 504, "timeout"


class Internal(EngineError):
    status, kind = 500, "server_error"


def check_name(name: str) -> str:
    """An adapter name: letters, digits, `_ . -`; never only dots (`..` is not a name)."""
    if not NAME_PATTERN.fullmatch(name) or set(name) == {"."}:
        raise EngineError(
            f"invalid adapter name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . - (and not only dots)"
        )
    return name


class TooMany(EngineError):
    status, kind = 429, "rate_limit_error"
