"""Batching, a leaf the tasks and the trainer share: encoded examples, right padding,
padding-free packing, and length-grouped batch order. No task and no model in here.

    padded  (B, W):  [a a a a . .]      packed (1, N):  [a a a a b b b c c c c c]
                     [b b b . . .]      position_ids    [0 1 2 3 0 1 2 0 1 2 3 4]
                     [c c c c c .]      cu_seq_lens     [0, 4, 7, 12]
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100  # label id the loss skips (prompt tokens, padding, non-first sub-tokens)
PACK_FROM_PADDING = 0.15  # pack a batch whose padded layout would be at least this much padding


@dataclass
class Encoded:
    """One example as token ids. `labels` is an int (classification) or a list aligned
    with (NER, causal-lm) or independent of (seq2seq) `input_ids`."""

    input_ids: list[int]
    labels: Any = None
    token_type_ids: list[int] | None = None
    word_ids: list[int | None] | None = None  # NER: which word each token came from
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    def without_targets(self) -> Encoded:
        """The same inputs with every label ignored (a row that only pads a rank's shard)."""
        if self.labels is None:
            return self
        labels = IGNORE if isinstance(self.labels, int) else [IGNORE] * len(self.labels)
        return Encoded(self.input_ids, labels, self.token_type_ids, self.word_ids, self.truncated)


def pad(rows: Iterable[list[int]], width: int, value: int) -> torch.Tensor:
    """[len(rows), width] long: each row right-padded with `value`."""
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def padded_batch(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (and token_type_ids) padded to this batch's longest row."""
    width = max(len(e) for e in batch)
    out = {
        "input_ids": pad([e.input_ids for e in batch], width, pad_id),
        "attention_mask": pad([[1] * len(e) for e in batch], width, 0),
    }
    if batch[0].token_type_ids is not None:
        out["token_type_ids"] = pad([e.token_type_ids for e in batch], width, 0)
    return out


def padding_share(batch: Sequence[Encoded]) -> float:
    """The fraction of a right-padded (len(batch), longest) layout that would be padding."""
    return 1 - sum(len(e) for e in batch) / (len(batch) * max(len(e) for e in batch))


def pack(batch: Sequence[Encoded]) -> dict[str, Any]:
    """Causal-LM examples as one padding-free row (attention kept apart by train/packing.py).

    Each example's first label is dropped (the previous example's last token must not learn to
    predict it); in a padded batch that label is never a target anyway (position t predicts
    t+1), so the loss is the same."""
    ids, positions, labels, bounds = [], [], [], [0]
    for e in batch:
        ids += e.input_ids
        positions += range(len(e))
        labels += [IGNORE, *e.labels[1:]] if e.labels is not None else [IGNORE] * len(e)
        bounds.append(bounds[-1] + len(e))
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(len(e) for e in batch)
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "labels": torch.tensor([labels]),
        # transformers' names for variable-length attention: they reach every attention call
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """`items` in consecutive slices of `size` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, mega_batches: int = 50
) -> list[list[int]]:
    """Split ``range(len(lengths))`` into batches of similar lengths (less padding).

    Shuffle the indices, sort each chunk of ``mega_batches * batch_size`` by length
    (longest first), cut it into batches, then shuffle the batch order. Sorting only within
    chunks keeps randomness between epochs/seeds; shuffling batches avoids a length
    curriculum. Deterministic for a seed; every index appears exactly once; at most one
    batch is short. With ``shuffle=False`` nothing is shuffled (for evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    batches = []
    for chunk in chunks(order, batch_size * mega_batches):
        by_length = sorted(chunk, key=lambda i: lengths[i], reverse=True)
        batches += [list(b) for b in chunks(by_length, batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
