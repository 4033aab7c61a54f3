"""What every task shares: the `Task` protocol, choosing a data set's columns, label sets.

A task module (one file each beside this one) declares everything about its task: the
columns it reads (`choose_fields`), how a record becomes an example (`to_example`), encoding
and collation, loss targets, metrics, the transformers Auto class its model loads with, and
PEFT's `task_type`. Adding a task means adding one file and one line in `__init__`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batching import IGNORE, Encoded, chunks, pad, padded_batch
from ..data import DataError
from ..distributed import DistContext


# -- which columns feed a task ---------------------------------------------------------------
@dataclass(frozen=True)
class Fields:
    """Which record columns feed a task; ``None`` means unused. What `text`, `pair` and
    `label` mean is the task's (its module docstring says); ``messages`` names a chat column."""

    task: str
    text: str | None = None
    pair: str | None = None
    label: str | None = None
    messages: str | None = None


class ColumnFinder:
    """Matches candidate names against the columns (case-insensitively) with helpful errors."""

    def __init__(self, columns: list[str], task: str, source: str):
        self.columns, self.task, self.source = columns, task, source
        self.by_lower = {column.lower(): column for column in reversed(columns)}  # first wins

    def check(self, override: str | None, role: str) -> None:
        if override is not None and override not in self.columns:
            raise DataError(
                f"column {override!r} (--{role}-field) not found in {self.source}; "
                f"columns are: {', '.join(self.columns)}"
            )

    def pair(self, pairs: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
        for a, b in pairs:
            if a in self.by_lower and b in self.by_lower:
                return self.by_lower[a], self.by_lower[b]
        return None

    def one(
        self,
        override: str | None,
        candidates: Iterable[str],
        role: str,
        exclude: Iterable[str] = (),
        required: bool = True,
    ) -> str | None:
        if override is not None:
            return override
        for name in dict.fromkeys(candidates):  # dedupe, keep order
            column = self.by_lower.get(name)
            if column is not None and column not in exclude:
                return column
        if not required:
            return None
        looked_for = ", ".join(dict.fromkeys(candidates))
        raise DataError(
            f"no {role} column for task {self.task!r} in {self.source}: looked for {looked_for}; "
            f"columns are: {', '.join(self.columns)}. Set --{role}-field COLUMN."
        )


@dataclass(frozen=True)
class Overrides:
    """The user's --text-field / --pair-field / --label-field / messages column."""

    text: str | None = None
    pair: str | None = None
    label: str | None = None
    messages: str | None = None

    @property
    def auto(self) -> bool:
        """No column named: known column pairs may be guessed."""
        return self.text is None and self.label is None and self.pair is None


def value(record: dict, column: str) -> Any:
    """``record[column]``, failing clearly on a missing value."""
    found = record.get(column)
    if found is None:
        raise DataError(f"no value in column {column!r}")
    return found


# -- label sets (classification, NER) --------------------------------------------------------
def build_label_map(
    train_examples: Sequence[dict], eval_examples: Sequence[dict] | None = None, eval_source: str = "the eval data"
) -> list[str]:
    """The sorted label list of classification (``label``) or NER (``tags``) examples.

    Labels are strings; when all look like integers they sort numerically (``'2' < '10'``),
    otherwise alphabetically, so the mapping is stable across runs. A label found in
    ``eval_examples`` but never in training raises ``DataError`` naming it and ``eval_source``."""
    train = _labels_of(train_examples)
    if not train:
        raise DataError("no labels in the training examples")
    unseen = _labels_of(eval_examples or []) - train
    if unseen:
        raise DataError(
            f"label(s) {', '.join(map(repr, _sorted_labels(unseen)))} in {eval_source} never occur in "
            "the training data; fix the labels or train on data that covers them"
        )
    return _sorted_labels(train)


def _labels_of(examples: Iterable[dict]) -> set[str]:
    labels: set[str] = set()
    for example in examples:
        labels.update(map(str, example["tags"]) if "tags" in example else [str(example["label"])])
    return labels


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    labels = list(labels)
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


# -- the task protocol -----------------------------------------------------------------------
@dataclass
class Task:
    """A task: subclasses fill in the class attributes and encode / evaluate / predict."""

    tokenizer: Any
    max_length: int = 128
    labels: list[str] = field(default_factory=list)  # classification / NER label names

    name: ClassVar[str]
    auto_class: ClassVar[str]  # the transformers Auto class its model loads with
    peft_task_type: ClassVar[str]  # PEFT's task_type in adapter_config.json
    metric: ClassVar[str] = "loss"  # what picks the best checkpoint
    greater_is_better: ClassVar[bool] = False
    labelled: ClassVar[bool] = False  # trains on a label set read from the data
    generative: ClassVar[bool] = False  # scores generated text (BLEU, ROUGE-L)
    can_pack: ClassVar[bool] = False  # padding-free training batches apply
    label_shift: ClassVar[int] = 0  # causal LMs: position t predicts token t+1
    architectures: ClassVar[tuple[str, ...]] = ()  # suffixes of transformers class names for this task

    def __post_init__(self) -> None:
        self.label_ids = {label: i for i, label in enumerate(self.labels)}

    # -- data ---------------------------------------------------------------------------------
    @classmethod
    def choose_fields(cls, find: ColumnFinder, given: Overrides) -> Fields:
        """The columns this task reads, from the user's overrides or common names."""
        raise NotImplementedError

    @staticmethod
    def to_example(record: dict, fields: Fields) -> dict:
        """One record as this task's normalized example (the module docstring lists its keys)."""
        raise NotImplementedError

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, example: dict) -> Encoded:
        raise NotImplementedError

    def encode_all(self, examples: Sequence[dict]) -> list[Encoded]:
        return [self.encode(e) for e in examples]

    def collate(self, batch: Sequence[Encoded], packed: bool = False) -> dict[str, torch.Tensor]:
        """Pad to the longest row of this batch (right padding), with an attention mask.
        `packed` asks for a padding-free row where the task supports it (`can_pack`)."""
        out = padded_batch(batch, self.tokenizer.pad_token_id)
        if batch[0].labels is not None:
            out["labels"] = self._collate_labels(batch, out["input_ids"].shape[1])
        return out

    def _collate_labels(self, batch: Sequence[Encoded], width: int) -> torch.Tensor:
        return pad([e.labels for e in batch], width, IGNORE)

    # -- loss ---------------------------------------------------------------------------------
    def count_targets(self, encoded: Sequence[Encoded]) -> int:
        """How many terms the loss sums over for these examples (padding adds none)."""
        count = 0
        for e in encoded:
            if e.labels is None:
                continue
            if isinstance(e.labels, int):
                count += e.labels != IGNORE
            else:
                count += sum(label != IGNORE for label in e.labels[self.label_shift :])
        return count

    def model_inputs(self, batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """What `model` is called with: the batch without its labels (the task computes the
        loss itself; given labels, a Hugging Face model would compute a second one)."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def loss_sum(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy summed over the batch's targets (not averaged: the trainer divides by
        the whole step's target count, so accumulation and data parallelism stay exact)."""
        logits, labels = outputs.logits, batch["labels"]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward_all(
        self, model: nn.Module, encoded: Sequence[Encoded], batch_size: int, predict: bool = True
    ) -> tuple[list[torch.Tensor], float, float]:
        """One forward per batch: each batch's argmax predictions (if `predict`), and the loss
        summed over targets with the number of targets (rows without labels add nothing)."""
        preds, total, count = [], 0.0, 0.0
        for batch in chunks(encoded, batch_size):
            inputs = on_device(self.collate(batch), model)
            out = model(**self.model_inputs(inputs, model))
            if "labels" in inputs:
                total += self.loss_sum(out, inputs).item()
                count += self.count_targets(batch)
            if predict:
                preds.append(out.logits.argmax(-1))
        return preds, total, count

    def eval_loss(
        self, model: nn.Module, examples: Sequence[dict], batch_size: int, dist: DistContext | None = None
    ) -> float:
        """Mean loss per target, computed on this rank's shard and summed across ranks."""
        dist = dist or DistContext()
        _, total, count = self.forward_all(model, self.encode_shard(examples, dist), batch_size, predict=False)
        total, count = dist.sum([total, count])
        return total / max(count, 1)

    def encode_shard(self, examples: Sequence[dict], dist: DistContext) -> list[Encoded]:
        """This rank's examples, encoded; rows that only pad the shard carry no loss targets."""
        indices, real = dist.shard_indices(len(examples))
        encoded = [self.encode(examples[i]) for i in indices]
        return encoded[:real] + [e.without_targets() for e in encoded[real:]]

    def evaluate(
        self,
        model: nn.Module,
        examples: Sequence[dict],
        batch_size: int = 32,
        dist: DistContext | None = None,
        **kwargs,
    ) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, model: nn.Module, examples: Sequence[dict], batch_size: int = 32) -> list:
        raise NotImplementedError


def on_device(batch: Any, model: nn.Module) -> dict[str, Any]:
    """The batch's tensors on the device of `model`'s parameters (a no-op on CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}


def takes_argument(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` (or that of the module a DDP wrapper holds) takes `name`."""
    model = getattr(model, "module", model)
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
