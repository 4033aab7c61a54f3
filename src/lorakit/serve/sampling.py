"""Choosing each row's next token, and turning tokens into text that respects stop strings.

`next_tokens` is greedy unless a row asks for temperature (then nucleus sampling with the
row's own generator, so a seed reproduces one request whatever else is in the batch).
`TextTail.add` appends a token to a job and says what text is now certain (a split UTF-8
character or the start of a stop string is held back) and whether the job is finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .jobs import Job, Sampling, TokenLogprob


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from softmax(logits / temperature), limited to the top-p nucleus: the
    smallest set of most likely tokens whose mass reaches top_p. logits: [vocab]."""
    probs = (logits / sampling.temperature).softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(jobs: Sequence[Job], logits: torch.Tensor) -> torch.Tensor:
    """[rows]: each row's next token from logits: [rows, vocab]. A row that asks for logprobs
    gets the chosen token's (under the model, before temperature) as `job.pending`."""
    tokens = logits.argmax(-1)
    for i, job in enumerate(jobs):
        if job.sampling.temperature > 0:
            tokens[i] = sample(logits[i], job.sampling, job.generator)
        if job.sampling.logprobs is not None:
            job.pending = scored(logits[i].log_softmax(-1), int(tokens[i]), job.sampling.logprobs)
    return tokens


def scored(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s logprob and the `k` most likely tokens, from logprobs: [vocab]."""
    values, ids = logprobs.topk(k) if k else (logprobs[:0], logprobs[:0].long())
    return TokenLogprob(token, float(logprobs[token]), dict(zip(ids.tolist(), values.tolist())))


def prompt_logprobs(prompt: Sequence[int], logits: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each prompt token scored by the positions before it: logits: [len(prompt), vocab] (the
    logits at the prompt's own positions). The first token has no logprob (nothing predicts it)."""
    logprobs = logits[:-1].float().log_softmax(-1)  # position p - 1 predicts token p: [len - 1, vocab]
    return [TokenLogprob(prompt[0], None, {})] + [scored(row, token, k) for row, token in zip(logprobs, prompt[1:])]


def request_generator(sampling: Sampling) -> torch.Generator | None:
    """A generator per sampled request: its own seed (or a fresh one), the global RNG untouched."""
    if sampling.temperature <= 0:
        return None
    generator = torch.Generator()
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


class TextTail:
    """Decodes a job's tokens and decides how much of the text is final."""

    def __init__(self, decode: Callable[[list[int]], str], eos: set[int], max_context: int) -> None:
        self.decode, self.eos, self.max_context = decode, eos, max_context

    def add(self, job: Job, token: int) -> tuple[str, str | None]:
        """Append `token` to `job`: (text that became certain, finish reason or None)."""
        reason = None
        if job.pending is not None:  # every chosen token is scored, an end-of-sequence one too (as
            job.logprobs.append(job.pending)  # OpenAI and vLLM do: lm-eval drops the last entry)
            job.pending = None
        if token in self.eos:
            reason = "stop"
        else:
            job.tokens.append(token)
        text = self.decode(job.tokens)
        cut = min((i for i in (text.find(s) for s in job.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and (
            len(job.tokens) >= job.sampling.max_tokens or len(job.prompt_ids) + len(job.tokens) >= self.max_context
        ):
            reason = "length"
        job.output = text
        if reason is not None:
            return "", reason
        # Hold back what may still change: a split UTF-8 character, the start of a stop string.
        hold = max((len(s) - 1 for s in job.sampling.stop), default=0)
        ready = len(text) - hold if not text.endswith("\ufffd") else job.sent
        if ready <= job.sent:
            return "", None
        delta, job.sent = text[job.sent : ready], ready
        return delta, None
