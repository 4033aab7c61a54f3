"""Reading data into plain Python records, independent of any tokenizer, model or task.

``read_records(path_or_name)`` -> ``list[dict]``: one dict per row, columns as found, from
JSONL, CSV/TSV, CoNLL, E2E's ``MR||text`` lines or a `datasets` directory / hub name. Which
columns feed a task, and the examples they make, are the task's business (train/tasks/).
"""

from __future__ import annotations

import csv
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "FORMATS",
    "detect_format",
    "read_conll",
    "read_csv",
    "read_e2e",
    "read_hf",
    "read_jsonl",
    "read_records",
]

FORMATS = ("jsonl", "csv", "tsv", "conll", "e2e", "hf")
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
