"""Token classification (NER): words -> one BIO tag each. Metric: entity F1 (seqeval).

Example: ``{'tokens': [str], 'tags': [str]}``. Columns: text (the token list), label (the tag list).
Words are split into sub-tokens; the first sub-token of each word carries the word's tag, the
others (and special tokens) are ignored by the loss (the usual BERT recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import metrics as M
from ..batching import IGNORE, Encoded
from ..data import DataError
from ..distributed import DistContext
from .base import ColumnFinder, Fields, Overrides, Task, value

TOKENS = ("tokens", "words")
TAGS = ("tags", "ner_tags", "labels", "label")


class TokenClassification(Task):
    name = "ner"
    auto_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    architectures = ("ForTokenClassification",)
    metric, greater_is_better, labelled = "f1", True, True

    @classmethod
    def choose_fields(cls, find: ColumnFinder, given: Overrides) -> Fields:
        tokens = find.one(given.text, TOKENS, "text")
        return Fields(cls.name, text=tokens, label=find.one(given.label, TAGS, "label", exclude=(tokens,)))

    @staticmethod
    def to_example(record: dict, fields: Fields) -> dict:
        tokens = [str(token) for token in _as_list(value(record, fields.text))]
        tags = [str(tag) for tag in _as_list(value(record, fields.label))]
        if len(tokens) != len(tags):
            raise DataError(f"{len(tokens)} tokens but {len(tags)} tags in columns {fields.text!r}/{fields.label!r}")
        return {"tokens": tokens, "tags": tags}

    def encode(self, example: dict) -> Encoded:
        enc = self.tokenizer(example["tokens"], is_split_into_words=True, truncation=True, max_length=self.max_length)
        word_ids = enc.word_ids()
        tags = example.get("tags")
        labels, previous = [], None
        for w in word_ids:
            first = w is not None and w != previous
            labels.append(self.label_ids[tags[w]] if first and tags is not None else IGNORE)
            previous = w
        kept = {w for w in word_ids if w is not None}
        return Encoded(
            enc["input_ids"],
            labels if tags is not None else None,
            enc.get("token_type_ids"),
            word_ids=word_ids,
            truncated=len(kept) < len(example["tokens"]),
        )

    def _tags(self, encoded: Sequence[Encoded], preds: list[torch.Tensor], examples: Sequence[dict]) -> list[list[str]]:
        """Per word, the tag predicted at its first sub-token; words cut by truncation stay "O"."""
        rows = [row for batch in preds for row in batch.tolist()]
        out = []
        for row, enc, ex in zip(rows, encoded, examples):
            tags, previous = ["O"] * len(ex["tokens"]), None
            for pos, w in enumerate(enc.word_ids):
                if w is not None and w != previous:
                    tags[w] = self.labels[row[pos]]
                previous = w
            out.append(tags)
        return out

    def predict(self, model, examples, batch_size: int = 32) -> list[list[str]]:
        encoded = self.encode_all(examples)
        preds, _, _ = self.forward_all(model, encoded, batch_size)
        return self._tags(encoded, preds, examples)

    def evaluate(
        self, model, examples, batch_size: int = 32, dist: DistContext | None = None, **kwargs
    ) -> dict[str, float]:
        """Entity-level P/R/F1 (seqeval, percent) and loss, sharded over ranks."""
        dist = dist or DistContext()
        encoded = self.encode_shard(examples, dist)
        preds, total, count = self.forward_all(model, encoded, batch_size)
        tags = dist.gather(self._tags(encoded, preds, dist.shard(examples)), len(examples))
        scores = M.ner_scores(tags, [e["tags"] for e in examples])
        total, count = dist.sum([total, count])
        return {"loss": total / max(count, 1), **scores}


def _as_list(found: Any) -> list:
    return found.split() if isinstance(found, str) else list(found)  # "EU rejects" from CSV cells
