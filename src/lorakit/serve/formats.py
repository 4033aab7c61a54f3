"""How a finished request and its server-sent-event chunks look, per OpenAI endpoint."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from . import protocol as P
from .jobs import Event
from .logprobs import Decode, chat_logprobs, completion_logprobs


class CompletionFormat:
    """How a finished request and its stream chunks look for one endpoint. `decode` (token ids
    to text) renders echoed prompts and logprobs."""

    def __init__(self, model: str, decode: Decode | None = None) -> None:
        self.model, self.id, self.created = model, P.new_id(self.prefix), P.now()
        self.decode = decode

    prefix = "cmpl"

    def usage(self, finals: list[Event]) -> P.Usage:
        prompt = sum(e.prompt_tokens for e in finals)
        completion = sum(e.completion_tokens for e in finals)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def response(self, finals: list[Event]) -> Any:
        choices = [
            P.CompletionChoice(
                index=e.index,
                text=(self.decode(e.prompt_ids) if e.prompt_ids is not None else "") + e.text,
                logprobs=None if e.logprobs is None else completion_logprobs(e.logprobs, self.decode),
                finish_reason=e.finish_reason,
            )
            for e in finals
        ]
        return P.Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage(finals)
        )

    def chunk(self, event: Event, first: bool) -> Any:
        choice = P.CompletionChoice(index=event.index, text=event.delta, finish_reason=event.finish_reason)
        return P.Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, finals: list[Event]) -> Any:
        return P.Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage(finals))


class ChatFormat(CompletionFormat):
    prefix = "chatcmpl"

    def response(self, finals: list[Event]) -> Any:
        choices = [
            P.ChatChoice(
                index=e.index,
                message=P.AssistantMessage(content=e.text),
                logprobs=None if e.logprobs is None else chat_logprobs(e.logprobs, self.decode),
                finish_reason=e.finish_reason,
            )
            for e in finals
        ]
        return P.ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage(finals)
        )

    def chunk(self, event: Event, first: bool) -> Any:
        delta = P.Delta(role="assistant" if first else None, content=event.delta)
        choice = P.ChunkChoice(index=event.index, delta=delta, finish_reason=event.finish_reason)
        return P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, finals: list[Event]) -> Any:
        return P.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage(finals)
        )


def sse(payload: Any) -> str:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


async def prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item
