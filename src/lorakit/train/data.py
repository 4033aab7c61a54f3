"""Reading training data into plain Python records, independent of any tokenizer or model.

The pipeline is three small steps, each usable on its own:

1. ``read_records(path_or_name)`` -> ``list[dict]``: one dict per row, columns as found.
2. ``resolve_fields(records, task)`` -> ``Fields``: which columns feed the task
   (auto-detected from common names; every choice can be overridden).
3. ``to_examples(records, fields)`` -> normalized examples per task:

   ============== ==========================================================
   task           example
   ============== ==========================================================
   classification ``{'text': str, 'text_pair': str | None, 'label': str}``
   ner            ``{'tokens': list[str], 'tags': list[str]}``
   causal-lm      ``{'prompt': str, 'response': str}`` or ``{'messages': [...]}``
   seq2seq        ``{'source': str, 'target': str}``
   ============== ==========================================================

Plus ``build_label_map`` (label vocabularies), ``group_references`` (E2E multi-reference
grouping for BLEU) and ``length_grouped_batches`` (similar-length batches, no torch).
"""

from __future__ import annotations

import csv
import json
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "Fields",
    "FORMATS",
    "TASKS",
    "build_label_map",
    "detect_format",
    "group_references",
    "length_grouped_batches",
    "read_conll",
    "read_csv",
    "read_e2e",
    "read_hf",
    "read_jsonl",
    "read_records",
    "resolve_fields",
    "to_examples",
]

FORMATS = ("jsonl", "csv", "tsv", "conll", "e2e", "hf")
TASKS = ("classification", "ner", "causal-lm", "seq2seq")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".conll": "conll", ".txt": "conll"}
# Review datasets hold multi-megabyte quoted fields; csv's default limit (128 KiB) rejects
# them. sys.maxsize overflows a C long on Windows, hence the 32-bit cap.
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


class DataError(ValueError):
    """Bad or unreadable training data; the message names the problem and the fix."""


# --------------------------------------------------------------------------- reading


def detect_format(path_or_name: str | Path) -> str:
    """Return the format of a file, dataset directory or hub name (one of ``FORMATS``).

    ``.txt`` files are E2E when their first non-blank line contains ``||``, else CoNLL.
    A name that does not exist locally and looks like no data file path is taken as a hub dataset.
    """
    path = Path(path_or_name)
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if not path.exists():
        if suffix in _EXTENSIONS or str(path_or_name).startswith((".", "/", "~", "\\")):
            raise DataError(f"data file not found: {path}. Check the path (relative paths start at {Path.cwd()}).")
        return "hf"  # e.g. 'glue:sst2' or 'stanfordnlp/imdb'
    if suffix not in _EXTENSIONS:
        raise DataError(
            f"unsupported file extension {suffix!r} for {path}; supported: {', '.join(_EXTENSIONS)} "
            "or a directory saved with datasets' save_to_disk. "
            f"Or set the format explicitly: one of {', '.join(FORMATS)}."
        )
    if suffix == ".txt" and "||" in _first_nonblank_line(path):
        return "e2e"
    return _EXTENSIONS[suffix]


def read_records(path_or_name: str | Path, split: str | None = None, fmt: str | None = None) -> list[dict]:
    """Read a data file, a saved dataset directory or a hub dataset into a list of dicts.

    ``fmt`` (one of ``FORMATS``) overrides detection from the extension. ``split`` selects the
    split of a Hugging Face dataset and is ignored for plain files (each file is one split).
    Raises ``DataError`` for a missing file, an unknown format or an empty result.
    """
    fmt = fmt or detect_format(path_or_name)
    if fmt == "hf":
        return read_hf(str(path_or_name), split)
    readers = {
        "jsonl": read_jsonl,
        "csv": read_csv,
        "tsv": partial(read_csv, delimiter="\t"),
        "conll": read_conll,
        "e2e": read_e2e,
    }
    if fmt not in readers:
        raise DataError(f"unknown data format {fmt!r}; supported: {', '.join(FORMATS)}")
    path = Path(path_or_name)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    records = readers[fmt](path)
    if not records:
        raise DataError(f"{path} holds no records; is it the right file?")
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON Lines (one object per line, blank lines skipped) or a ``.json`` array of objects."""
    text = Path(path).read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):  # a whole-file JSON array, the other common .json layout
        rows = _parse_json(text, path, "the file")
        if not all(isinstance(row, dict) for row in rows):
            raise DataError(f"{path}: expected a JSON array of objects (one per example)")
        return rows
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            row = _parse_json(line, path, f"line {number}")
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            records.append(row)
    return records


def read_csv(path: str | Path, delimiter: str = ",") -> list[dict]:
    """Read CSV/TSV with a required header row; quoted fields may span lines."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path} is empty; a header row naming the columns is required")
        records = []
        for row in reader:
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(row)} fields but the header has {len(header)} "
                    f"({', '.join(header)}); quote fields that contain the delimiter or line breaks"
                )
            records.append(dict(zip(header, row)))
    return records


def read_conll(path: str | Path) -> list[dict]:
    """Read CoNLL (``TOKEN ... TAG`` per line, blank line between sentences) into
    ``{'tokens': [...], 'tags': [...]}`` records. The tag is the last column, so both
    ``TOKEN TAG`` and CoNLL-2003's ``TOKEN POS CHUNK TAG`` work; ``-DOCSTART-`` lines are skipped.
    """
    records: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if tokens:
                    records.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            if len(columns) < 2:
                raise DataError(f"{path}, line {number}: token {columns[0]!r} has no tag; expected 'TOKEN ... TAG'")
            tokens.append(columns[0])
            tags.append(columns[-1])
    if tokens:  # no blank line after the last sentence
        records.append({"tokens": tokens, "tags": tags})
    return records


def read_e2e(path: str | Path) -> list[dict]:
    """Read the E2E NLG format (``MR||reference`` per line) into ``{'mr': ..., 'ref': ...}`` records.

    The same MR repeats once per reference; see ``group_references`` for BLEU.
    """
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            # MR attributes are separated by a single '|', so the first '||' is the split point.
            mr, sep, ref = line.partition("||")
            if not sep:
                raise DataError(f"{path}, line {number}: no '||' between meaning representation and reference")
            records.append({"mr": mr.strip(), "ref": ref.strip()})
    return records


def read_hf(name_or_dir: str, split: str | None = None) -> list[dict]:
    """Read a Hugging Face dataset: a ``save_to_disk`` directory or a hub name ``name[:config]``.

    A dataset with several splits needs ``split`` unless it has exactly one. Integer
    ``ClassLabel`` columns (and lists of them, as in NER tags) are decoded to their names.
    """
    import datasets  # heavy import, only when needed

    try:
        if Path(name_or_dir).is_dir():
            loaded = datasets.load_from_disk(name_or_dir)
        else:
            name, _, config = name_or_dir.partition(":")
            loaded = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # many backend error types; all mean "could not load"
        raise DataError(
            f"could not load Hugging Face dataset {name_or_dir!r} (no such local file or directory either): {error}"
        ) from error
    if isinstance(loaded, dict):  # DatasetDict
        loaded = _choose_split(loaded, split, name_or_dir)
    if len(loaded) == 0:
        raise DataError(f"split {split!r} of {name_or_dir} is empty")
    return _decode_class_labels(loaded.to_list(), loaded.features)


def _choose_split(splits: dict, split: str | None, name: str) -> Any:
    if split is None and len(splits) == 1:
        return next(iter(splits.values()))
    if split not in splits:
        wanted = "choose a split" if split is None else f"no split {split!r}"
        raise DataError(f"{name}: {wanted}; available splits: {', '.join(splits)} (set split= / --split)")
    return splits[split]


def _decode_class_labels(records: list[dict], features: dict) -> list[dict]:
    """Replace ``ClassLabel`` ints by their names, so labels read the same as from files."""
    for column, feature in features.items():
        inner = getattr(feature, "feature", None)  # Sequence/List of ClassLabel
        names = getattr(feature, "names", None) or getattr(inner, "names", None)
        if not names:
            continue
        for record in records:
            value = record[column]
            is_list = isinstance(value, list)
            record[column] = [_label_name(v, names) for v in value] if is_list else _label_name(value, names)
    return records


def _label_name(index: int, names: list[str]) -> str:
    return names[index] if 0 <= index < len(names) else str(index)  # -1 marks unlabeled rows


def _parse_json(text: str, path: str | Path, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, {where}: malformed JSON ({error.msg} at column {error.colno})") from error


def _first_nonblank_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return next((line for line in handle if line.strip()), "")


# --------------------------------------------------------------------------- fields

# Candidate column names, most specific first; matched case-insensitively.
_TEXT = (
    "text", "sentence", "content", "review", "document", "body", "comment", "tweet", "utterance", "question", "query",
)
_TEXT_PAIRS = (
    ("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"), ("question", "sentence"),
    ("question", "passage"), ("question", "context"), ("text1", "text2"), ("text_a", "text_b"), ("query", "document"),
)
_LABEL = ("label", "labels", "target", "class", "category", "gold_label")
_TOKENS = ("tokens", "words")
_TAGS = ("tags", "ner_tags", "labels", "label")
_MESSAGES = ("messages", "conversation")
_LM_PAIRS = (
    ("prompt", "response"), ("prompt", "completion"), ("instruction", "output"), ("instruction", "response"),
    ("question", "answer"), ("query", "response"),
)
_S2S_PAIRS = (
    ("source", "target"), ("input", "output"), ("src", "tgt"), ("document", "summary"), ("article", "highlights"),
    ("article", "summary"), ("dialogue", "summary"), ("mr", "ref"), ("meaning_representation", "human_reference"),
    ("meaning_representation", "target"), ("question", "answer"), ("prompt", "response"),
)
_DOCUMENT = ("text", "content", "document")


@dataclass(frozen=True)
class Fields:
    """Which record columns feed a task; ``None`` means unused.

    ============== ====================================== ========================= ===========
    task           text                                   pair                      label
    ============== ====================================== ========================= ===========
    classification the text                               second text of a pair     the label
    ner            the token list                         --                        the tag list
    causal-lm      the prompt, or the whole document      an instruction's 'input', the response
                   when ``label`` is ``None``             appended to the prompt
    seq2seq        the source                             --                        the target
    ============== ====================================== ========================= ===========

    ``messages`` (causal-lm only) names a chat column of ``[{role, content}, ...]`` lists;
    when set, the other fields are unused.
    """

    task: str
    text: str | None = None
    pair: str | None = None
    label: str | None = None
    messages: str | None = None


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

    Overrides (``text_field`` -> ``Fields.text`` and so on) must name existing columns; names
    are otherwise matched case-insensitively. Known pairs (sentence1/sentence2, prompt/response,
    instruction(+input)/output, source/target, mr/ref, ...) win over single columns, but only
    when none of text/pair/label is overridden; an override stops guessing its partners.
    ``source`` names the data (e.g. the file) in error messages.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not records:
        raise DataError(f"{source} holds no records")
    columns = list(dict.fromkeys(key for record in records for key in record))
    find = _ColumnFinder(columns, task, source)
    overrides = {"text": text_field, "pair": pair_field, "label": label_field, "messages": messages_field}
    for role, column in overrides.items():
        find.check(column, role)
    auto = text_field is None and label_field is None and pair_field is None

    if task == "classification":
        if auto and (pair := find.pair(_TEXT_PAIRS)):
            return Fields(task, text=pair[0], pair=pair[1], label=find.one(None, _LABEL, "label", exclude=pair))
        text = find.one(text_field, _TEXT, "text")
        return Fields(task, text=text, pair=pair_field, label=find.one(label_field, _LABEL, "label", exclude=(text,)))
    if task == "ner":
        tokens = find.one(text_field, _TOKENS, "text")
        return Fields(task, text=tokens, label=find.one(label_field, _TAGS, "label", exclude=(tokens,)))
    if task == "seq2seq":
        if auto and (pair := find.pair(_S2S_PAIRS)):
            return Fields(task, text=pair[0], label=pair[1])
        text = find.one(text_field, [a for a, _ in _S2S_PAIRS], "text")
        target = find.one(label_field, [b for _, b in _S2S_PAIRS], "label", exclude=(text,))
        return Fields(task, text=text, label=target)
    return _resolve_causal_lm(find, auto, text_field, pair_field, label_field, messages_field)


def _resolve_causal_lm(
    find: _ColumnFinder,
    auto: bool,
    text_field: str | None,
    pair_field: str | None,
    label_field: str | None,
    messages_field: str | None,
) -> Fields:
    if messages_field is None and auto:
        messages_field = find.one(None, _MESSAGES, "messages", required=False)
    if messages_field:
        return Fields("causal-lm", messages=messages_field)
    if auto and (pair := find.pair(_LM_PAIRS + _S2S_PAIRS)):
        text, label = pair
    elif label_field:  # a response column; find the prompt beside it
        label = label_field
        text = find.one(text_field, [a for a, _ in _LM_PAIRS + _S2S_PAIRS], "text", exclude=(label,))
    else:  # one column that is the whole document (prompt is empty, loss on everything)
        text, label = find.one(text_field, _DOCUMENT, "text"), None
    # Alpaca-style data: the optional 'input' belongs to the instruction, not the response.
    if pair_field is None and auto and text.lower() == "instruction":
        pair_field = find.one(None, ("input",), "pair", required=False)
    return Fields("causal-lm", text=text, pair=pair_field, label=label)


class _ColumnFinder:
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


# --------------------------------------------------------------------------- examples


def to_examples(records: Sequence[dict], fields: Fields, source: str = "the data") -> list[dict]:
    """Convert records to the normalized per-task examples listed in the module docstring.

    Labels become strings (``1`` and ``"1"`` are the same class). A missing or malformed
    value raises ``DataError`` naming the row (1-based) and column.
    """
    converters = {
        "classification": _classification_example,
        "ner": _ner_example,
        "causal-lm": _causal_lm_example,
        "seq2seq": _seq2seq_example,
    }
    if fields.task not in converters:
        raise DataError(f"unknown task {fields.task!r}; choose one of {', '.join(TASKS)}")
    convert = converters[fields.task]
    examples = []
    for row, record in enumerate(records, start=1):
        try:
            examples.append(convert(record, fields))
        except DataError as error:
            raise DataError(f"{source}, row {row}: {error}") from None
    return examples


def _value(record: dict, column: str) -> Any:
    """``record[column]``, failing clearly on a missing value."""
    value = record.get(column)
    if value is None:
        raise DataError(f"no value in column {column!r}")
    return value


def _seq2seq_example(record: dict, fields: Fields) -> dict:
    return {"source": str(_value(record, fields.text)), "target": str(_value(record, fields.label))}


def _classification_example(record: dict, fields: Fields) -> dict:
    label = str(_value(record, fields.label)).strip()
    if not label:
        raise DataError(f"empty label in column {fields.label!r}")
    pair = str(_value(record, fields.pair)) if fields.pair else None
    return {"text": str(_value(record, fields.text)), "text_pair": pair, "label": label}


def _ner_example(record: dict, fields: Fields) -> dict:
    tokens = [str(token) for token in _as_list(_value(record, fields.text))]
    tags = [str(tag) for tag in _as_list(_value(record, fields.label))]
    if len(tokens) != len(tags):
        raise DataError(f"{len(tokens)} tokens but {len(tags)} tags in columns {fields.text!r}/{fields.label!r}")
    return {"tokens": tokens, "tags": tags}


def _causal_lm_example(record: dict, fields: Fields) -> dict:
    if fields.messages:
        messages = _value(record, fields.messages)
        chat = isinstance(messages, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
        if not chat:
            raise DataError(f"column {fields.messages!r} must hold lists of {{'role': ..., 'content': ...}} messages")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if fields.label is None:
        return {"prompt": "", "response": str(_value(record, fields.text))}
    prompt = str(_value(record, fields.text))
    extra = str(record.get(fields.pair) or "").strip() if fields.pair else ""  # optional, often empty
    # The chat/prompt template is the trainer's business; here the input just follows the instruction.
    return {"prompt": f"{prompt}\n\n{extra}" if extra else prompt, "response": str(_value(record, fields.label))}


def _as_list(value: Any) -> list:
    return value.split() if isinstance(value, str) else list(value)  # "EU rejects" from CSV cells


def build_label_map(
    train_examples: Sequence[dict], eval_examples: Sequence[dict] | None = None, eval_source: str = "the eval data"
) -> list[str]:
    """Return the sorted label list of classification (``label``) or NER (``tags``) examples.

    Labels are strings; when all look like integers they sort numerically (``'2' < '10'``),
    otherwise alphabetically, so the mapping is stable across runs. A label found in
    ``eval_examples`` but never in training raises ``DataError`` naming it and ``eval_source``.
    """
    train = _labels_of(train_examples)
    if not train:
        raise DataError("no labels in the training examples")
    unseen = _labels_of(eval_examples or []) - train
    if unseen:
        raise DataError(
            f"label(s) {', '.join(map(repr, _sorted_labels(unseen)))} in {eval_source} never occur in the "
            "training data; fix the labels or train on data that covers them"
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


def group_references(
    examples: Sequence[dict], source_key: str = "source", target_key: str = "target"
) -> dict[str, list[str]]:
    """Group the references of repeated sources (E2E lists each MR once per reference).

    Returns ``{source: [reference, ...]}`` in first-seen order, which is what multi-reference
    BLEU needs: one hypothesis per key, scored against all its references.
    """
    groups: dict[str, list[str]] = {}
    for example in examples:
        groups.setdefault(example[source_key], []).append(example[target_key])
    return groups


# --------------------------------------------------------------------------- batching


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
    chunk_size = batch_size * mega_batches
    batches = []
    for start in range(0, len(order), chunk_size):
        chunk = sorted(order[start : start + chunk_size], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
