"""The adapters a server knows and the ones held in its model: load, replace, evict (LRU),
unload, and the directory watch's view of the adapters dir.

Adapters are known (on disk) or loaded (in the model, an LRU of at most `max_adapters`). A
request holds its adapter's *slot* from the moment the worker binds it until it finishes:
eviction only takes unheld slots, and unloading or replacing a held slot retires it, so it
leaves the model when its last request is done. Inside the model a slot is named `slot<N>`,
which lets a replacement load beside the version still in use.

Methods that touch the model run on the engine's worker thread (or in a test, on the only
thread); the read-only views (`resolve`, `model_names`, `adapters`, ...) are safe from any
thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_dir import ADAPTER_CONFIG, read_task_info
from ..lora import AdapterLoadError, delete_adapter, load_adapter
from ..lora.io import WEIGHTS_NAME
from ..train.tasks import task_of
from .errors import NAME_PATTERN, AdapterRefused, Busy, EngineError, Forbidden, UnknownAdapter, check_name
from .jobs import EngineEvents, Job

log = logging.getLogger("lorakit.serve")


@dataclass(eq=False)
class Slot:
    """One adapter's weights inside the model, under the name `id`."""

    id: str
    name: str
    labels: list[str]
    holds: int = 0
    retired: bool = False  # replaced or unloaded: leaves the model when holds reach 0


@dataclass(eq=False)
class Adapter:
    """An adapter the server knows: where it lives and, while loaded, its slot."""

    name: str
    path: Path
    fingerprint: tuple
    from_dir: bool  # a subdirectory of the adapters dir: the watch manages it
    slot: Slot | None = None


class AdapterRegistry:
    def __init__(
        self,
        model: torch.nn.Module,
        task: str,
        adapters_dir: str | Path,
        *,
        name: str,
        base_names: Iterable[str],
        max_adapters: int,
        allow_any_path: bool = False,
        events: EngineEvents | None = None,
    ) -> None:
        self.model, self.task, self.name = model, task, name
        self.adapters_dir = Path(adapters_dir).resolve()
        self.base_names = set(base_names)
        self.max_adapters, self.allow_any_path = max_adapters, allow_any_path
        self.events = events or EngineEvents()
        self._adapters: dict[str, Adapter] = {}
        self._loaded: OrderedDict[str, Slot] = OrderedDict()  # LRU order: oldest first
        self._skip: dict[str, tuple] = {}  # dir adapters not to (re)load until their files change
        self._slot_ids = itertools.count()
        self._lock = threading.Lock()  # guards the dicts above for readers on other threads

    # -- views, safe from any thread ---------------------------------------------------------
    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names; None for the base model."""
        if model in self.base_names:
            return None
        with self._lock:
            if model in self._adapters:
                return model
        raise UnknownAdapter(model, self.model_names())

    def model_names(self) -> list[str]:
        with self._lock:
            return [self.name, *sorted(self._adapters)]

    def adapters(self) -> list[dict]:
        """Every known adapter: name, path, whether loaded, requests holding it."""
        with self._lock:
            return [
                {
                    "name": a.name,
                    "path": str(a.path),
                    "loaded": a.slot is not None,
                    "in_use": a.slot.holds if a.slot else 0,
                    "from_dir": a.from_dir,
                }
                for a in sorted(self._adapters.values(), key=lambda a: a.name)
            ]

    def loaded_names(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"adapters_known": len(self._adapters), "adapters_loaded": len(self._loaded)}

    def checked_path(self, name: str, path: str | Path) -> tuple[Path, bool]:
        """Where an admin load of `name` reads from (a relative path is inside the adapters
        dir; any path must be, unless `allow_any_path`), and whether that is the watched
        subdirectory of the same name."""
        check_name(name)
        if name in self.base_names:
            raise EngineError(f"{name!r} is the base model's name; pick another adapter name")
        path = Path(path).expanduser()
        resolved = (path if path.is_absolute() else self.adapters_dir / path).resolve()
        if not self.allow_any_path and not resolved.is_relative_to(self.adapters_dir):
            raise Forbidden(
                f"{path} is outside the adapters dir {self.adapters_dir} "
                "(start the server with --allow-any-path to allow that)"
            )
        with self._lock:
            self._skip.pop(name, None)
        return resolved, resolved.parent == self.adapters_dir and resolved.name == name

    def changes(self) -> tuple[list[tuple[str, Path, tuple]], list[str]]:
        """What the adapters dir asks for: (name, path, fingerprint) of the new or rewritten
        subdirectories to (re)load, and the names of the vanished ones to unload."""
        found = adapter_dirs(self.adapters_dir)
        with self._lock:
            known, skip = dict(self._adapters), dict(self._skip)
        installs = []
        for name, path in found.items():
            fingerprint = file_fingerprint(path)
            entry = known.get(name)
            stale = entry is not None and entry.from_dir and entry.fingerprint != fingerprint
            if skip.get(name) != fingerprint and name not in self.base_names and (entry is None or stale):
                installs.append((name, path, fingerprint))
        removals = [name for name, entry in known.items() if entry.from_dir and name not in found]
        return installs, removals

    def skip_until_changed(self, name: str, fingerprint: tuple) -> None:
        """A dir adapter that failed to load: not retried until its files change."""
        with self._lock:
            self._skip[name] = fingerprint

    # -- changes to the model: the worker thread only -----------------------------------------
    def install(self, name: str, path: Path, from_dir: bool) -> bool:
        """Load `path` as adapter `name` (True: it replaced one). The old version, if any,
        retires only once the new one has loaded (a refused replacement leaves it serving)."""
        old = self._adapters.get(name)
        if (old is None or old.slot is None) and not self._make_room():
            raise Busy(f"all {self.max_adapters} adapter slots are in use; retry shortly")
        slot = self._load_slot(name, path)
        entry = Adapter(name, path, file_fingerprint(path), from_dir, slot)
        with self._lock:
            if old is not None and old.slot is not None:
                self._loaded.pop(name)
                self._retire(old.slot)
            self._adapters[name] = entry
            self._loaded[name] = slot
        return old is not None

    def remove(self, name: str, remember: bool) -> None:
        """Forget adapter `name`; `remember`: a dir adapter stays unloaded until it changes."""
        with self._lock:
            entry = self._adapters.pop(name, None)
            if entry is None:
                raise UnknownAdapter(name, [self.name, *sorted(self._adapters)])
            if entry.slot is not None:
                self._loaded.pop(name)
                self._retire(entry.slot)
            if remember and entry.from_dir:
                self._skip[name] = entry.fingerprint

    def acquire(self, job: Job) -> bool:
        """Hold the slot of the job's adapter, loading it (maybe evicting another) if needed.
        False: every slot is held by running requests, so wait."""
        if job.adapter is not None:
            entry = self._adapters.get(job.adapter)
            if entry is None:
                raise UnknownAdapter(job.adapter, [self.name, *sorted(self._adapters)])
            if entry.slot is None:
                if not self._make_room():
                    return False
                slot = self._load_slot(entry.name, entry.path)
                with self._lock:
                    entry.slot = self._loaded[entry.name] = slot
            with self._lock:
                self._loaded.move_to_end(entry.name)
            entry.slot.holds += 1
            job.slot = entry.slot
        job.bound = True
        return True

    def release(self, job: Job) -> None:
        slot, job.slot, job.bound = job.slot, None, False
        if slot is not None:
            slot.holds -= 1
            if slot.retired and slot.holds == 0:
                self._drop(slot)

    def _load_slot(self, name: str, path: Path) -> Slot:
        info = task_file(path)
        if task_of(info) not in (None, self.task):
            raise AdapterRefused(f"adapter {name!r} is a {task_of(info)} adapter; this server serves {self.task}")
        slot = Slot(f"slot{next(self._slot_ids)}", name, list(info.get("labels") or []))
        try:
            load_adapter(self.model, path, adapter_name=slot.id)
        except (AdapterLoadError, ValueError, OSError, KeyError) as e:
            raise AdapterRefused(f"adapter {name!r} cannot be loaded onto {self.name}: {e}") from e
        self.model.eval()
        return slot

    def _make_room(self) -> bool:
        """Evict least recently used, unheld adapters until one more fits."""
        while len(self._loaded) >= self.max_adapters:
            victim = next((s for s in self._loaded.values() if s.holds == 0), None)
            if victim is None:
                return False
            with self._lock:
                self._loaded.pop(victim.name)
                self._adapters[victim.name].slot = None
            self._drop(victim)
            self.events.on_evict(victim.name)
        return True

    def _retire(self, slot: Slot) -> None:
        slot.retired = True
        if slot.holds == 0:
            self._drop(slot)

    def _drop(self, slot: Slot) -> None:
        delete_adapter(self.model, slot.id)


def file_fingerprint(path: Path) -> tuple:
    """Changes whenever either adapter file is rewritten (the watch reloads on change)."""
    stats = []
    for name in (ADAPTER_CONFIG, WEIGHTS_NAME):
        try:
            s = (path / name).stat()
            stats.append((s.st_mtime_ns, s.st_size))
        except OSError:
            stats.append(None)
    return tuple(stats)


def task_file(path: Path) -> dict:
    """The adapter's task info; {} when it records none (then it may serve any task)."""
    try:
        return read_task_info(path)
    except (ValueError, OSError):
        return {}


def adapter_dirs(root: Path) -> dict[str, Path]:
    """Subdirectories of `root` holding an adapter config, under valid names."""
    found = {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if (path / ADAPTER_CONFIG).is_file():
            if NAME_PATTERN.fullmatch(path.name) and set(path.name) != {"."}:
                found[path.name] = path
            else:
                log.warning("skipping %s: not a valid adapter name", path)
    return found


def dir_task(root: Path) -> dict:
    """The task (and labels) of the first adapter in `root` that records one."""
    for path in adapter_dirs(root).values():
        info = task_file(path)
        if task_of(info):
            return {**info, "task": task_of(info)}
    return {}
