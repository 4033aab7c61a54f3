"""Sequence classification: text (+ a second text) -> one label. Metric: accuracy (also F1).

Example: ``{'text': str, 'text_pair': str | None, 'label': str}``.
Columns: text (the text), pair (the second text of a pair), label (the class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import metrics as M
from ..batching import Encoded
from ..data import DataError
from ..distributed import DistContext
from .base import ColumnFinder, Fields, Overrides, Task, value

TEXT = (
    "text",
    "sentence",
    "content",
    "review",
    "document",
    "body",
    "comment",
    "tweet",
    "utterance",
    "question",
    "query",
)
TEXT_PAIRS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("question", "passage"),
    ("question", "context"),
    ("text1", "text2"),
    ("text_a", "text_b"),
    ("query", "document"),
)
LABEL = ("label", "labels", "target", "class", "category", "gold_label")


class Classification(Task):
    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    architectures = ("ForSequenceClassification",)
    metric, greater_is_better, labelled = "accuracy", True, True

    @classmethod
    def choose_fields(cls, find: ColumnFinder, given: Overrides) -> Fields:
        if given.auto and (pair := find.pair(TEXT_PAIRS)):
            return Fields(cls.name, text=pair[0], pair=pair[1], label=find.one(None, LABEL, "label", exclude=pair))
        text = find.one(given.text, TEXT, "text")
        return Fields(
            cls.name, text=text, pair=given.pair, label=find.one(given.label, LABEL, "label", exclude=(text,))
        )

    @staticmethod
    def to_example(record: dict, fields: Fields) -> dict:
        label = str(value(record, fields.label)).strip()
        if not label:
            raise DataError(f"empty label in column {fields.label!r}")
        pair = str(value(record, fields.pair)) if fields.pair else None
        return {"text": str(value(record, fields.text)), "text_pair": pair, "label": label}

    def encode(self, example: dict) -> Encoded:
        enc = self.tokenizer(example["text"], example.get("text_pair"), truncation=False)
        truncated = len(enc["input_ids"]) > self.max_length
        if truncated:
            enc = self.tokenizer(example["text"], example.get("text_pair"), truncation=True, max_length=self.max_length)
        label = self.label_ids[example["label"]] if "label" in example else None
        return Encoded(enc["input_ids"], label, enc.get("token_type_ids"), truncated=truncated)

    def _collate_labels(self, batch: Sequence[Encoded], width: int) -> torch.Tensor:
        return torch.tensor([e.labels for e in batch])

    def predict(self, model, examples, batch_size: int = 32) -> list[str]:
        preds, _, _ = self.forward_all(model, self.encode_all(examples), batch_size)
        return [self.labels[int(i)] for batch in preds for i in batch]

    def evaluate(
        self, model, examples, batch_size: int = 32, dist: DistContext | None = None, **kwargs
    ) -> dict[str, float]:
        """Accuracy and F1 (percent) and loss, one forward pass per batch, sharded over ranks."""
        dist = dist or DistContext()
        preds, total, count = self.forward_all(model, self.encode_shard(examples, dist), batch_size)
        ids = dist.gather([int(i) for batch in preds for i in batch], len(examples))
        scores = M.classification_scores([self.labels[i] for i in ids], [e["label"] for e in examples], self.labels)
        total, count = dist.sum([total, count])
        return {"loss": total / max(count, 1), **scores}
