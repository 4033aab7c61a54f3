"""What an adapter directory on disk says about itself, for every layer that needs it.

lorakit writes `lorakit_task.json` beside PEFT's `adapter_config.json`: the task, the label
names, the base model, the data fields. An adapter PEFT trained has only `task_type` in its
config. Training writes this file; evaluation, the server and the CLI read it. It sits below
them all (beside _fs.py, which writes it atomically), so none of them reaches up for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._fs import atomic_write_json

TASK_FILE = "lorakit_task.json"
ADAPTER_CONFIG = "adapter_config.json"


def write_task_info(adapter_dir: str | Path, **info: Any) -> None:
    """Write lorakit's task file (task, labels, base model, data fields), atomically."""
    atomic_write_json(Path(adapter_dir) / TASK_FILE, info)


class TaskInfoError(ValueError):
    """An adapter directory that does not say what it was trained for."""


def read_task_info(adapter_dir: str | Path) -> dict[str, Any]:
    """lorakit's task file, else PEFT's `task_type` and base model from adapter_config.json.

    Returns {"task", "labels", "model", "max_length", ...} from lorakit's file, or {"task":
    None, "task_type", "labels", "model", "max_length"} for a PEFT adapter, whose task_type
    may be None too (the task registry, `train.tasks.task_of`, says which task a task_type is;
    without one the base model's architecture may). Raises TaskInfoError for a directory
    that is not an adapter."""
    adapter_dir = Path(adapter_dir)
    file = adapter_dir / TASK_FILE
    if file.is_file():
        info = _read_json(file)
        if not isinstance(info.get("task"), str):
            raise TaskInfoError(f"{file} names no task; retrain, or pass --task")
        return info
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise TaskInfoError(
            f"{adapter_dir} has no {ADAPTER_CONFIG}: it is not an adapter directory (give the "
            "output directory of `lorakit train`, or one PEFT's save_pretrained wrote)"
        )
    peft = _read_json(adapter_dir / ADAPTER_CONFIG)
    task_type, base = peft.get("task_type"), peft.get("base_model_name_or_path")
    return {
        "task": None,
        "task_type": task_type if isinstance(task_type, str) and task_type else None,
        "labels": [],
        "model": base if isinstance(base, str) else None,
        "max_length": 256,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TaskInfoError(f"{path} is not readable JSON ({e}); re-save the adapter") from e
    if not isinstance(data, dict):
        raise TaskInfoError(f"{path} holds {type(data).__name__}, expected a JSON object; re-save the adapter")
    return data


def trained_on(adapter_dir: str | Path) -> str | None:
    """The base model as the run that trained the adapter named it (an alias, a GGUF path), if
    lorakit trained it; adapter_config.json records the portable name (a hub id) instead."""
    try:
        return read_task_info(adapter_dir).get("model")
    except TaskInfoError:
        return None
