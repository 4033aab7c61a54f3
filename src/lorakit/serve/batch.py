"""The running batch of a decoder and its KV cache: prefill new rows, splice them in, decode
one token for every row, let finished rows leave.

Rows are left-padded to one length, so every row's next token sits in the last column:
    mask  [rows, cached columns]   1 where a column holds a real token of that row
    cache every layer's keys/values [rows, heads, cached columns, head dim]
Positions count each row's real tokens, so padding never shifts a row's RoPE angles.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..models import cache_keyword
from .errors import EngineError
from .jobs import Job


class RunningBatch:
    """Running rows: their KV cache (left-padded to one length), the attention mask over the
    cached columns, and the token each row feeds next."""

    def __init__(self, jobs: list[Job], cache, mask: torch.Tensor, next_tokens: torch.Tensor) -> None:
        self.jobs, self.cache, self.mask, self.next = jobs, cache, mask, next_tokens

    def join(self, other: RunningBatch) -> None:
        """Append `other`'s rows, both left-padded to the longer cache."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width, 2), left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([left_pad(mine.values, width, 2), left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(other.mask, width, 1)])
        self.next = torch.cat([self.next, other.next])
        self.jobs += other.jobs

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop the leading columns that every remaining row pads."""
        index = torch.tensor(rows, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask, self.next = self.mask[index], self.next[index]
        self.jobs = [self.jobs[i] for i in rows]
        start = int(self.mask.any(0).int().argmax())
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]


def left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


class DecoderStep:
    """Forward passes of a decoder over the running batch: prefill and one-token decode."""

    def __init__(self, model: torch.nn.Module, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.cache_kw, self.logits_kwargs = forward_keywords(model)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                every_position: bool = False) -> torch.Tensor:  # fmt: skip
        """[rows, vocab] fp32 logits at each row's last position (the cache grows in place);
        `every_position`: [rows, columns, vocab] in the model's dtype (scoring a prompt)."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: cache},
            **({} if every_position else self.logits_kwargs),
        )
        return out.logits if every_position else out.logits[:, -1].float()

    def prefill(self, jobs: Sequence[Job], every_position: bool = False) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """The prompts of `jobs`, left-padded, through the model: (mask, cache, logits), the
        logits at every column if asked (the last column: each row's next token)."""
        from transformers import DynamicCache

        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        return mask, cache, self.forward(ids, mask, positions, cache, every_position)

    def decode(self, batch: RunningBatch) -> torch.Tensor:
        """Every row's next token through the model; extends the batch's mask by one column."""
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.jobs), 1)], 1)
        positions = batch.mask.sum(1, keepdim=True)  # each row's next position: its real tokens so far
        logits = self.forward(batch.next[:, None], mask, positions, batch.cache)
        batch.mask = mask
        return logits


def forward_keywords(model: torch.nn.Module) -> tuple[str, dict]:
    """The forward's cache keyword and how to keep only the last position's logits; refuses
    models whose cache the running batch cannot splice."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers):
        raise EngineError(
            f"{type(model).__name__} uses sliding-window or other special attention layers; "
            "lorakit serve batches only decoders with full attention"
        )
    logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    return cache_keyword(model), logits


def context_length(model: torch.nn.Module, tokenizer) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and 0 < length < 1_000_000 else 2048


def eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids
