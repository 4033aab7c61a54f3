"""The task registry: one module per task, everything about the task inside it.

    classification   text (+ pair) -> label             metric: accuracy (also f1)
    ner              tokens -> BIO tags, first sub-token labelled   metric: entity f1 (seqeval)
    causal-lm        prompt -> response, loss on the response only  metric: loss (+ BLEU, ROUGE-L)
    seq2seq          source -> target                   metric: loss (+ BLEU, ROUGE-L)

Adding a task: a module with a `Task` subclass, and its class in `REGISTRY` below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..batching import IGNORE, Encoded
from ..data import DataError
from .base import ColumnFinder, Fields, Overrides, Task, build_label_map, on_device
from .causal_lm import CausalLM, chat_text, check_prompt_template
from .classification import Classification
from .generative import Generative, group_references
from .ner import TokenClassification
from .seq2seq import Seq2Seq

REGISTRY: dict[str, type[Task]] = {cls.name: cls for cls in (Classification, TokenClassification, CausalLM, Seq2Seq)}
TASKS = tuple(REGISTRY)
_BY_PEFT_TYPE = {cls.peft_task_type: name for name, cls in REGISTRY.items()}


def task_class(name: str) -> type[Task]:
    if name not in REGISTRY:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return REGISTRY[name]


def make_task(
    name: str, tokenizer: Any, max_length: int, labels: Sequence[str] = (), prompt_template: str | None = None
) -> Task:
    """The task `name`, reading with `tokenizer`; `prompt_template` (causal-lm only) wraps every prompt."""
    task = task_class(name)(tokenizer, max_length, list(labels))
    if prompt_template is not None:
        if not isinstance(task, CausalLM):
            raise DataError(f"a prompt template applies to causal-lm prompts, not to the {name} task; drop it")
        check_prompt_template(prompt_template)
        task.prompt_template = prompt_template
    return task


def task_of(info: dict[str, Any]) -> str | None:
    """The task an adapter directory's info names (`adapter_dir.read_task_info`): lorakit's
    own, else the one PEFT's `task_type` stands for; None when neither is known."""
    return info.get("task") or _BY_PEFT_TYPE.get(info.get("task_type") or "")


def task_for_architectures(architectures: Sequence[str]) -> str | None:
    """The one task whose model classes a base's `config.architectures` names (e.g.
    "LlamaForCausalLM" -> causal-lm); None when none or several match."""
    found = {name for arch in architectures for name, cls in REGISTRY.items()
             if any(arch.endswith(suffix) for suffix in cls.architectures)}  # fmt: skip
    return found.pop() if len(found) == 1 else None


def resolve_fields(
    records: Sequence[dict],
    task: str,
    *,
    text_field: str | None = None,
    pair_field: str | None = None,
    label_field: str | None = None,
    messages_field: str | None = None,
    source: str = "the data",
) -> Fields:
    """Find the columns a task needs, from common names or the given overrides.

    Overrides must name existing columns; names are otherwise matched case-insensitively.
    Known pairs (sentence1/sentence2, prompt/response, instruction(+input)/output,
    source/target, mr/ref, ...) win over single columns, but only when none of
    text/pair/label is overridden; an override stops guessing its partners. ``source`` names
    the data (e.g. the file) in error messages."""
    cls = task_class(task)
    if not records:
        raise DataError(f"{source} holds no records")
    columns = list(dict.fromkeys(key for record in records for key in record))
    find = ColumnFinder(columns, task, source)
    given = Overrides(text_field, pair_field, label_field, messages_field)
    for role in ("text", "pair", "label", "messages"):
        find.check(getattr(given, role), role)
    return cls.choose_fields(find, given)


def to_examples(records: Sequence[dict], fields: Fields, source: str = "the data") -> list[dict]:
    """Records as the task's normalized examples. Labels become strings (``1`` and ``"1"``
    are the same class); a missing or malformed value raises DataError naming the row
    (1-based) and column."""
    convert = task_class(fields.task).to_example
    examples = []
    for row, record in enumerate(records, start=1):
        try:
            examples.append(convert(record, fields))
        except DataError as error:
            raise DataError(f"{source}, row {row}: {error}") from None
    return examples


__all__ = [
    "IGNORE",
    "REGISTRY",
    "TASKS",
    "CausalLM",
    "Classification",
    "ColumnFinder",
    "Encoded",
    "Fields",
    "Generative",
    "Seq2Seq",
    "Task",
    "TokenClassification",
    "build_label_map",
    "chat_text",
    "check_prompt_template",
    "group_references",
    "make_task",
    "on_device",
    "resolve_fields",
    "task_class",
    "task_for_architectures",
    "task_of",
    "to_examples",
]
