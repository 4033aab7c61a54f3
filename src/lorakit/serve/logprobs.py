"""Token log-probabilities in OpenAI's two shapes: the legacy completions one (parallel lists,
with character offsets into the choice's text) and chat's (one object per token)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import protocol as P
from .jobs import TokenLogprob

Decode = Callable[[list[int]], str]


def completion_logprobs(entries: Sequence[TokenLogprob], decode: Decode) -> P.CompletionLogprobs:
    """`entries` (an echoed prompt's tokens, then the completion's) as the completions API
    returns them; text_offset counts characters from the start of the choice's text."""
    ids = [e.token for e in entries]
    return P.CompletionLogprobs(
        tokens=[decode([t]) for t in ids],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[None if e.logprob is None else {decode([t]): lp for t, lp in e.top.items()} for e in entries],
        text_offset=[len(decode(ids[:i])) for i in range(len(ids))],
    )


def chat_logprobs(entries: Sequence[TokenLogprob], decode: Decode) -> P.ChatLogprobs:
    def top(token: int, logprob: float) -> P.TopLogprob:
        text = decode([token])
        return P.TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return P.ChatLogprobs(
        content=[
            P.ChatTokenLogprob(
                **top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top.items()]
            )
            for e in entries
        ]
    )
