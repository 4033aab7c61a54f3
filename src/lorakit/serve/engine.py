"""Many adapters on one frozen base model: the adapter registry and the batching scheduler
behind `lorakit serve`, usable without HTTP.

    engine = Engine.from_pretrained("smollm2-135m", "adapters/")   # each subdirectory: one adapter
    with engine:                                                     # starts the worker thread
        done = engine.generate(["Hi!", "Hello"], adapters=["support", None], max_tokens=20)

Design
------
* One worker thread does all the torch work. HTTP handlers, the directory watch and admin
  calls reach it through a thread-safe inbox, so loading or evicting an adapter never races
  a forward pass.
* Step-level continuous batching. Each turn the worker admits waiting requests (FIFO, for
  any adapters), prefills them as one batch, splices their KV cache into the running batch
  (left-padded to a common length), then runs ONE decode step for every running row under
  `mixed_batch`: row i goes through its own adapter, one gathered matmul per layer. Rows
  leave after any step, new ones join before any step. With `mixed=False` (the baseline
  of the load test) a batch only ever holds one adapter and switches between requests.
* Registry. Adapters are known (on disk) or loaded (in the model, an LRU of at most
  `max_adapters`). A request holds its adapter's *slot* from the moment the worker sees it
  until it finishes: eviction only takes unheld slots, and unloading or replacing a held
  slot retires it, so it leaves the model when its last request is done. Inside the model
  a slot is named `slot<N>`, which lets a replacement load beside the version still in use.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import torch

from ..adapter_dir import read_task_info
from ..lora import AdapterLoadError, delete_adapter, disable_adapters, load_adapter, mixed_batch, set_adapter
from ..lora.config import CONFIG_NAME
from ..lora.io import WEIGHTS_NAME
from ..train.tasks import chat_text, task_class, task_of

log = logging.getLogger("lorakit.serve")

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
TASKS = ("causal-lm", "classification")


# -- errors: each carries the HTTP status it maps to ------------------------------------------
class EngineError(ValueError):
    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class UnknownAdapter(EngineError):
    status, kind = 404, "not_found_error"

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown model {name!r}; this server knows: {', '.join(known)}", known=list(known))


class AdapterRefused(EngineError):
    """The adapter does not fit the base model (architecture, shapes, files)."""
    status, kind = 422, "adapter_load_error"


class Forbidden(EngineError):
    status, kind = 403, "permission_error"


class Busy(EngineError):
    status, kind = 503, "server_busy"


class Timeout(EngineError):
    status, kind = 504, "timeout"


class Internal(EngineError):
    status, kind = 500, "server_error"


def check_name(name: str) -> str:
    """An adapter name: letters, digits, `_ . -`; never only dots (`..` is not a name)."""
    if not NAME_PATTERN.fullmatch(name) or set(name) == {"."}:
        raise EngineError(f"invalid adapter name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . - "
                          "(and not only dots)")
    return name


# -- configuration, requests, events ---------------------------------------------------------
@dataclass
class EngineConfig:
    max_adapters: int = 8            # adapters held in the model at once (LRU eviction beyond)
    max_batch_size: int = 32         # rows in one forward pass
    max_tokens: int = 512            # cap on a request's max_tokens
    request_timeout_s: float = 120.0
    mixed: bool = True               # False: one adapter per batch (the baseline to beat)
    watch_interval_s: float = 2.0    # poll the adapters dir this often; 0: no watch
    allow_any_path: bool = False     # admin loads may point outside the adapters dir

    def __post_init__(self) -> None:
        for key in ("max_adapters", "max_batch_size", "max_tokens"):
            if getattr(self, key) < 1:
                raise EngineError(f"{key} must be at least 1, not {getattr(self, key)}")


@dataclass
class Sampling:
    max_tokens: int | None = None    # None: as many as the cap and the context allow
    temperature: float = 0.0         # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Event:
    """What a request hears from the worker: new text, then one final event (finish_reason,
    or error; classification: result)."""
    index: int
    delta: str = ""
    finish_reason: str | None = None
    text: str = ""                   # the whole text, on the final event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: EngineError | None = None
    result: dict | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class Slot:
    """One adapter's weights inside the model, under the name `id`."""
    id: str
    name: str
    labels: list[str]
    holds: int = 0
    retired: bool = False            # replaced or unloaded: leaves the model when holds reach 0


@dataclass(eq=False)
class Adapter:
    """An adapter the server knows: where it lives and, while loaded, its slot."""
    name: str
    path: Path
    fingerprint: tuple
    from_dir: bool                   # a subdirectory of the adapters dir: the watch manages it
    slot: Slot | None = None


@dataclass(eq=False)
class Job:
    """One row of work: a prompt to continue, or a text to classify."""
    adapter: str | None
    index: int = 0
    emit: Callable[[Event], None] = lambda event: None
    deadline: float = float("inf")
    prompt_ids: list[int] = field(default_factory=list)
    text: str = ""                   # classification input
    sampling: Sampling = field(default_factory=Sampling)
    tokens: list[int] = field(default_factory=list)
    output: str = ""
    sent: int = 0                    # characters of `output` already emitted
    slot: Slot | None = None
    bound: bool = False              # holds its slot (or needs none: the base)
    cancelled: bool = False
    generator: torch.Generator | None = None

    def send(self, event: Event) -> None:
        """Hand `event` to the listener; a listener that fails must not take the worker down."""
        try:
            self.emit(event)
        except Exception:
            log.exception("a request's event listener failed")

    def fail(self, error: EngineError) -> None:
        self.send(Event(self.index, error=error))


class EngineEvents:
    """Hooks for metrics; the defaults do nothing. Called on the worker thread."""

    def on_batch(self, kind: str, rows: int) -> None: ...

    def on_evict(self, name: str) -> None: ...


# -- the running batch -----------------------------------------------------------------------
class _Batch:
    """Running rows: their KV cache (left-padded to one length), the attention mask over the
    cached columns, and the token each row feeds next."""

    def __init__(self, jobs: list[Job], cache, mask: torch.Tensor, next_tokens: torch.Tensor) -> None:
        self.jobs, self.cache, self.mask, self.next = jobs, cache, mask, next_tokens

    def join(self, other: _Batch) -> None:
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
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


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def _fingerprint(path: Path) -> tuple:
    """Changes whenever either adapter file is rewritten (the watch reloads on change)."""
    stats = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            s = (path / name).stat()
            stats.append((s.st_mtime_ns, s.st_size))
        except OSError:
            stats.append(None)
    return tuple(stats)


_STOP = object()


@dataclass
class _Command:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


# -- the engine ------------------------------------------------------------------------------
class Engine:
    """One base model, many adapters, one worker thread. See the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, task: str, adapters_dir: str | Path, *,
                 name: str, aliases: Iterable[str] = (), config: EngineConfig | None = None,
                 events: EngineEvents | None = None) -> None:
        if task not in TASKS:
            raise EngineError(f"lorakit serve serves {' and '.join(TASKS)} models, not {task!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.adapters_dir = Path(adapters_dir).resolve()
        self.name = name
        self.base_names = {name, *aliases}
        self.config = config or EngineConfig()
        self.events = events or EngineEvents()
        self.max_context = _context_length(model, tokenizer)
        self.eos = _eos_ids(model, tokenizer)
        self._adapters: dict[str, Adapter] = {}
        self._loaded: OrderedDict[str, Slot] = OrderedDict()   # LRU order: oldest first
        self._skip: dict[str, tuple] = {}     # dir adapters not to (re)load until their files change
        self._slot_ids = itertools.count()
        self._lock = threading.Lock()         # guards the dicts above for readers on other threads
        self._tokenizer_lock = threading.Lock()   # fast tokenizers are not safe to share across threads
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._batch: _Batch | None = None
        self._admitted: list[Job] = []          # taken from the queue this turn, maybe not yet in the batch
        self._worker: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        if task == "causal-lm":
            self._cache_kw, self._logits_kwargs = _forward_keywords(model)

    @classmethod
    def from_pretrained(cls, model: str, adapters_dir: str | Path, *, task: str | None = None,
                        served_name: str | None = None, config: EngineConfig | None = None) -> Engine:
        """Load `model` (alias, path or hub id) with the head its adapters need. The task is
        `task`, else the one the adapters in `adapters_dir` record, else causal-lm."""
        from ..models import load_model, load_tokenizer
        adapters_dir = Path(adapters_dir)
        if not adapters_dir.is_dir():
            raise FileNotFoundError(f"adapters dir {adapters_dir} does not exist")
        found = _dir_task(adapters_dir)
        task = task or found.get("task") or "causal-lm"
        labels = found.get("labels") if found.get("task") == task else None
        base = load_model(model, task_class(task).auto_class, label_names=labels or None).model
        return cls(base, load_tokenizer(model), task, adapters_dir, name=served_name or model,
                   aliases=[model], config=config)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the worker, load every adapter in the adapters dir, start the watch."""
        if self._worker is not None:
            return self
        self._stopping.clear()
        self._worker = threading.Thread(target=self._run, name="lorakit-serve-worker", daemon=True)
        self._worker.start()
        self.scan()
        if self.config.watch_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="lorakit-serve-watch", daemon=True)
            self._watcher.start()
        return self

    def stop(self) -> None:
        """Stop the watch and the worker; requests still queued or running fail with 503."""
        if self._worker is None:
            return
        self._stopping.set()
        if self._watcher is not None:      # first: a scan in progress still needs the worker
            self._watcher.join()
        self._inbox.put(_STOP)
        self._worker.join()
        self._worker = self._watcher = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    # -- adapters: public, thread-safe -------------------------------------------------------
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
            return [{"name": a.name, "path": str(a.path), "loaded": a.slot is not None,
                     "in_use": a.slot.holds if a.slot else 0, "from_dir": a.from_dir}
                    for a in sorted(self._adapters.values(), key=lambda a: a.name)]

    def loaded_names(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def load(self, name: str, path: str | Path) -> bool:
        """Load (or replace: True) adapter `name` from `path`; a relative path is taken inside
        the adapters dir, and any path must resolve inside it unless `allow_any_path`.
        Requests running on the old version finish on it."""
        check_name(name)
        if name in self.base_names:
            raise EngineError(f"{name!r} is the base model's name; pick another adapter name")
        resolved = self._checked_path(path)
        from_dir = resolved.parent == self.adapters_dir and resolved.name == name
        with self._lock:
            self._skip.pop(name, None)
        return self._call(lambda: self._install(name, resolved, from_dir))

    def unload(self, name: str) -> None:
        """Forget adapter `name`. Requests using it finish first; an adapter of the adapters
        dir stays unloaded until its files change or it is loaded again."""
        self._call(lambda: self._remove(name, remember=True))

    def scan(self) -> dict[str, list[str]]:
        """One pass of the directory watch: load new subdirectories, reload changed ones,
        unload vanished ones. Returns the names per action."""
        done: dict[str, list[str]] = {"loaded": [], "replaced": [], "removed": [], "failed": []}
        found = _adapter_dirs(self.adapters_dir)
        with self._lock:
            known, skip = dict(self._adapters), dict(self._skip)
        for name, path in found.items():
            fingerprint = _fingerprint(path)
            entry = known.get(name)
            stale = entry is not None and entry.from_dir and entry.fingerprint != fingerprint
            if skip.get(name) == fingerprint or name in self.base_names or (entry is not None and not stale):
                continue
            try:
                replaced = self._call(functools.partial(self._install, name, path, True))
                done["replaced" if replaced else "loaded"].append(name)
            except Busy:
                pass        # every slot is in use: try again on the next pass
            except EngineError as e:
                log.warning("adapter %s not served: %s", name, e)
                with self._lock:
                    self._skip[name] = fingerprint
                done["failed"].append(name)
        for name, entry in known.items():
            if entry.from_dir and name not in found:
                self._call(functools.partial(self._remove, name, False))
                done["removed"].append(name)
        return done

    # -- requests: public --------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """The chat template where the tokenizer has one; else the contents, one per line
        (as lorakit's causal-lm training formats a prompt)."""
        with self._tokenizer_lock:
            return self.tokenizer(chat_text(self.tokenizer, messages), add_special_tokens=False)["input_ids"]

    def generation_jobs(self, prompts: Sequence[list[int]], adapter: str | None, sampling: Sampling) -> list[Job]:
        """One job per tokenized prompt; refuses what cannot fit the context or the caps."""
        self._require_task("causal-lm", "/v1/completions or /v1/chat/completions")
        if not 1 <= len(prompts) <= self.config.max_batch_size:
            raise EngineError(f"give 1 to {self.config.max_batch_size} prompts per request, not {len(prompts)}")
        if sampling.max_tokens is not None and sampling.max_tokens > self.config.max_tokens:
            raise EngineError(f"max_tokens={sampling.max_tokens} exceeds this server's cap of {self.config.max_tokens}")
        jobs = []
        for i, ids in enumerate(prompts):
            room = self.max_context - len(ids)
            wanted = sampling.max_tokens or min(self.config.max_tokens, room)
            if not ids:
                raise EngineError(f"prompt {i} is empty")
            if room < 1 or wanted > room:
                raise EngineError(f"prompt {i} has {len(ids)} tokens; with max_tokens={wanted} that exceeds "
                                  f"the model's context of {self.max_context} tokens")
            job = Job(adapter, i, prompt_ids=list(ids), sampling=_replace(sampling, max_tokens=wanted))
            if sampling.temperature > 0:   # a generator per request: its own seed, the global RNG untouched
                job.generator = torch.Generator()
                if sampling.seed is None:
                    job.generator.seed()
                else:
                    job.generator.manual_seed(sampling.seed)
            jobs.append(job)
        return jobs

    def classification_jobs(self, texts: Sequence[str], adapter: str | None) -> list[Job]:
        self._require_task("classification", "/v1/classify")
        if not 1 <= len(texts) <= self.config.max_batch_size:
            raise EngineError(f"give 1 to {self.config.max_batch_size} inputs per request, not {len(texts)}")
        return [Job(adapter, i, text=t) for i, t in enumerate(texts)]

    def submit(self, jobs: Sequence[Job], emit: Callable[[Event], None]) -> None:
        """Queue `jobs`; the worker calls `emit` (on its thread) with every event."""
        if not self.alive:
            raise Busy("the engine is not running")
        deadline = time.monotonic() + self.config.request_timeout_s
        for job in jobs:
            job.emit, job.deadline = emit, deadline
            self._inbox.put(job)

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[Event]:
        """Submit `jobs` and yield their events until each has its final one. Leaving the
        loop early (a client that went away) cancels what is left."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):    # the loop closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        self.submit(jobs, emit)
        remaining = len(jobs)
        try:
            while remaining:
                event = await events.get()
                remaining -= event.final
                yield event
        finally:
            for job in jobs:
                job.cancelled = True

    def run(self, jobs: Sequence[Job]) -> list[Event]:
        """Blocking: submit `jobs` and return each one's final event (errors raised)."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(jobs, events.put)
        finals: dict[int, Event] = {}
        while len(finals) < len(jobs):
            event = events.get()
            if event.error is not None:
                raise event.error
            if event.final:
                finals[event.index] = event
        return [finals[i] for i in range(len(jobs))]

    def generate(self, prompts: Sequence[str], adapters: Sequence[str | None] | str | None = None,
                 **sampling: Any) -> list[Event]:
        """Blocking convenience: continue each prompt (raw text) with its adapter (one for
        all, or one per prompt; None: the base), greedy unless `temperature` is given."""
        names = adapters if isinstance(adapters, (list, tuple)) else [adapters] * len(prompts)
        jobs = [job for prompt, name in zip(prompts, names)
                for job in self.generation_jobs([self.encode_prompt(prompt)], self.resolve(name) if name else None,
                                                Sampling(**sampling))]
        for i, job in enumerate(jobs):
            job.index = i
        return self.run(jobs)

    def classify(self, texts: Sequence[str], adapter: str | None = None) -> list[dict]:
        """Blocking convenience: label and scores per text."""
        name = self.resolve(adapter) if adapter else None
        return [event.result for event in self.run(self.classification_jobs(texts, name))]

    def stats(self) -> dict[str, int]:
        batch = self._batch     # read once: the worker may replace it meanwhile
        with self._lock:
            return {"adapters_known": len(self._adapters), "adapters_loaded": len(self._loaded),
                    "waiting": len(self._waiting), "running": len(batch.jobs) if batch else 0}

    # -- helpers for the public API ----------------------------------------------------------
    def _require_task(self, task: str, endpoint: str) -> None:
        if self.task != task:
            raise EngineError(f"this server serves a {self.task} model; {endpoint} needs a {task} model")

    def _checked_path(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        resolved = (path if path.is_absolute() else self.adapters_dir / path).resolve()
        if not self.config.allow_any_path and not resolved.is_relative_to(self.adapters_dir):
            raise Forbidden(f"{path} is outside the adapters dir {self.adapters_dir} "
                            "(start the server with --allow-any-path to allow that)")
        return resolved

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread, between two steps, and return its result."""
        if not self.alive or threading.current_thread() is self._worker:
            return fn()
        command = _Command(fn, concurrent.futures.Future())
        self._inbox.put(command)
        return command.future.result()

    def _watch(self) -> None:
        while not self._stopping.wait(self.config.watch_interval_s):
            try:
                self.scan()
            except Exception:   # the watch must outlive a bad pass (a dir removed mid-scan, ...)
                log.exception("adapter directory scan failed")

    # -- registry: worker thread only ----------------------------------------------------------
    def _install(self, name: str, path: Path, from_dir: bool) -> bool:
        """Load `path` as adapter `name`; the old version, if any, retires only once the new
        one has loaded (a refused replacement leaves the old one serving)."""
        old = self._adapters.get(name)
        if (old is None or old.slot is None) and not self._make_room():
            raise Busy(f"all {self.config.max_adapters} adapter slots are in use; retry shortly")
        slot = self._load_slot(name, path)
        entry = Adapter(name, path, _fingerprint(path), from_dir, slot)
        with self._lock:
            if old is not None and old.slot is not None:
                self._loaded.pop(name)
                self._retire(old.slot)
            self._adapters[name] = entry
            self._loaded[name] = slot
        return old is not None

    def _remove(self, name: str, remember: bool) -> None:
        with self._lock:
            entry = self._adapters.pop(name, None)
            if entry is None:
                raise UnknownAdapter(name, [self.name, *sorted(self._adapters)])
            if entry.slot is not None:
                self._loaded.pop(name)
                self._retire(entry.slot)
            if remember and entry.from_dir:
                self._skip[name] = entry.fingerprint

    def _load_slot(self, name: str, path: Path) -> Slot:
        info = _task_file(path)
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
        while len(self._loaded) >= self.config.max_adapters:
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

    def _acquire(self, job: Job) -> bool:
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

    def _release(self, job: Job) -> None:
        slot, job.slot, job.bound = job.slot, None, False
        if slot is not None:
            slot.holds -= 1
            if slot.retired and slot.holds == 0:
                self._drop(slot)

    # -- the worker loop -----------------------------------------------------------------------
    def _run(self) -> None:
        while self._drain(self._patience()):
            self._sweep()
            self._bind()
            try:
                if self.task == "causal-lm":
                    self._generate_step()
                else:
                    self._classify_step()
            except Exception as e:   # a failed forward fails its batch; the server keeps serving
                log.exception("batch failed")
                self._fail_running(Internal(f"generation failed: {type(e).__name__}: {e}"))
        self._shut_down()

    def _shut_down(self) -> None:
        """Fail whatever is still running, waiting or in the inbox."""
        closing = Busy("the server is shutting down")
        self._fail_running(closing)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                self._waiting.append(item)
            elif isinstance(item, _Command):
                item.future.set_exception(closing)
        for job in self._waiting:
            self._end(job, closing)
        self._waiting.clear()

    def _patience(self) -> float | None:
        """How long to wait for the inbox: not at all while there is work; a little while jobs
        wait for a slot (their deadlines still count); else until something arrives."""
        if self._batch is not None or any(job.bound for job in self._waiting):
            return 0.0
        return 0.1 if self._waiting else None

    def _drain(self, wait: float | None) -> bool:
        """Take everything in the inbox: jobs queue up, commands run in arrival order (jobs
        that arrived first bind their adapters first). False when asked to stop."""
        try:
            item = self._inbox.get(block=wait != 0.0, timeout=wait)
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            if isinstance(item, Job):
                self._waiting.append(item)
            else:
                self._bind()
                try:
                    item.future.set_result(item.fn())
                except Exception as e:       # the caller gets it, the worker carries on
                    item.future.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _bind(self) -> None:
        """Give waiting jobs their adapter slots, first come first served: a job that must
        wait for a free slot makes those behind it wait too, so nobody starves."""
        for job in list(self._waiting):
            if job.bound:
                continue
            try:
                if not self._acquire(job):
                    return
            except EngineError as e:
                self._waiting.remove(job)
                job.fail(e)

    def _sweep(self) -> None:
        """Drop cancelled jobs (their client left) and time out overdue ones."""
        now = time.monotonic()
        for job in [j for j in self._waiting if j.cancelled or now > j.deadline]:
            self._waiting.remove(job)
            self._end(job, None if job.cancelled else self._timeout(job))
        if self._batch is not None:
            gone = [i for i, j in enumerate(self._batch.jobs) if j.cancelled or now > j.deadline]
            for i in gone:
                job = self._batch.jobs[i]
                self._end(job, None if job.cancelled else self._timeout(job))
            if gone:
                self._keep([i for i in range(len(self._batch.jobs)) if i not in gone])

    def _timeout(self, job: Job) -> Timeout:
        return Timeout(f"the request took longer than {self.config.request_timeout_s:g} s "
                       f"({len(job.tokens)} tokens generated)")

    def _end(self, job: Job, error: EngineError | None) -> None:
        self._release(job)
        if error is not None:
            job.fail(error)

    def _fail_running(self, error: EngineError) -> None:
        """Fail the running batch and the jobs just admitted (a prefill that raised)."""
        for job in (self._batch.jobs if self._batch else []) + self._admitted:
            if job.bound:
                self._end(job, error)
        self._batch, self._admitted = None, []

    def _admit(self, room: int) -> list[Job]:
        """Bound jobs from the head of the queue, while they fit (in the baseline mode: while
        they use the running batch's adapter)."""
        taken: list[Job] = []
        current = self._batch.jobs[0] if self._batch else None
        while self._waiting and len(taken) < room and self._waiting[0].bound:
            job = self._waiting[0]
            first = current or (taken[0] if taken else None)
            if not self.config.mixed and first is not None and job.slot is not first.slot:
                break
            taken.append(self._waiting.popleft())
        self._admitted = taken
        return taken

    def _adapters_for(self, jobs: Sequence[Job]):
        """Each row through its own adapter; the whole batch through the base when no row
        has one (mixed_batch wants at least one adapter)."""
        ids = [job.slot.id if job.slot else None for job in jobs]
        if all(i is None for i in ids):
            return disable_adapters(self.model)
        if self.config.mixed:
            return mixed_batch(self.model, ids)
        set_adapter(self.model, ids[0])   # baseline: one adapter per batch, switched per batch
        return contextlib.nullcontext()

    # -- generation ------------------------------------------------------------------------------
    def _generate_step(self) -> None:
        running = len(self._batch.jobs) if self._batch else 0
        new = self._admit(self.config.max_batch_size - running)
        if new:
            fresh = self._prefill(new)
            if self._batch is None:
                self._batch = fresh
            elif fresh is not None:
                self._batch.join(fresh)
        if self._batch is not None:
            self._decode()

    @torch.no_grad()
    def _forward(self, jobs: list[Job], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        with self._adapters_for(jobs):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self._cache_kw: cache}, **self._logits_kwargs)
        return out.logits[:, -1].float()

    def _prefill(self, jobs: list[Job]) -> _Batch | None:
        from transformers import DynamicCache
        width = max(len(j.prompt_ids) for j in jobs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.events.on_batch("prefill", len(jobs))
        logits = self._forward(jobs, ids, mask, positions, cache)
        batch = _Batch(list(jobs), cache, mask, self._pick(jobs, logits))
        return self._advance(batch)

    def _decode(self) -> None:
        batch = self._batch
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.jobs), 1)], 1)
        positions = batch.mask.sum(1, keepdim=True)    # each row's next position: its real tokens so far
        self.events.on_batch("decode", len(batch.jobs))
        logits = self._forward(batch.jobs, batch.next[:, None], mask, positions, batch.cache)
        batch.mask, batch.next = mask, self._pick(batch.jobs, logits)
        self._batch = self._advance(batch)

    def _pick(self, jobs: list[Job], logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for i, job in enumerate(jobs):
            if job.sampling.temperature > 0:
                tokens[i] = _sample(logits[i], job.sampling, job.generator)
        return tokens

    def _advance(self, batch: _Batch) -> _Batch | None:
        """Give each row its new token; finished rows leave the batch."""
        keep = []
        for i, (job, token) in enumerate(zip(batch.jobs, batch.next.tolist())):
            reason = self._append(job, token)
            if reason is None:
                keep.append(i)
            else:
                self._finish(job, reason)
        if not keep:
            return None
        if len(keep) < len(batch.jobs):
            batch.keep(keep)
        return batch

    def _keep(self, rows: list[int]) -> None:
        if rows:
            self._batch.keep(rows)
        else:
            self._batch = None

    def _append(self, job: Job, token: int) -> str | None:
        """Add a token, emit the text that is now certain; the finish reason, if done."""
        reason = None
        if token in self.eos:
            reason = "stop"
        else:
            job.tokens.append(token)
        with self._tokenizer_lock:
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in job.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and (len(job.tokens) >= job.sampling.max_tokens
                               or len(job.prompt_ids) + len(job.tokens) >= self.max_context):
            reason = "length"
        job.output = text
        if reason is None:
            # Hold back what may still change: a split UTF-8 character, the start of a stop string.
            hold = max((len(s) - 1 for s in job.sampling.stop), default=0)
            ready = len(text) - hold if not text.endswith("\ufffd") else job.sent
            if ready > job.sent:
                job.send(Event(job.index, delta=text[job.sent:ready]))
                job.sent = ready
        return reason

    def _finish(self, job: Job, reason: str) -> None:
        self._release(job)
        job.send(Event(job.index, delta=job.output[job.sent:], finish_reason=reason, text=job.output,
                       prompt_tokens=len(job.prompt_ids), completion_tokens=len(job.tokens)))

    # -- classification ----------------------------------------------------------------------
    @torch.no_grad()
    def _classify_step(self) -> None:
        jobs = self._admit(self.config.max_batch_size)
        if not jobs:
            return
        with self._tokenizer_lock:
            enc = self.tokenizer([j.text for j in jobs], padding=True, truncation=True,
                                 max_length=self.max_context, return_tensors="pt")
        self.events.on_batch("classify", len(jobs))
        with self._adapters_for(jobs):
            probs = self.model(**enc).logits.float().softmax(-1)
        for job, row in zip(jobs, probs.tolist()):
            labels = self._labels(job.slot, len(row))
            best = max(range(len(row)), key=row.__getitem__)
            self._release(job)
            job.send(Event(job.index, finish_reason="stop",
                           result={"label": labels[best], "scores": dict(zip(labels, row))}))

    def _labels(self, slot: Slot | None, count: int) -> list[str]:
        if slot is not None and len(slot.labels) == count:
            return slot.labels
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(count)]


# -- helpers ---------------------------------------------------------------------------------
def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    probs = (logits / sampling.temperature).softmax(-1)
    if sampling.top_p < 1.0:   # nucleus: the smallest set of tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _replace(sampling: Sampling, **changes: Any) -> Sampling:
    return Sampling(**{**sampling.__dict__, **changes})


def _context_length(model: torch.nn.Module, tokenizer) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and 0 < length < 1_000_000 else 2048


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def _forward_keywords(model: torch.nn.Module) -> tuple[str, dict]:
    """The forward's cache keyword and how to keep only the last position's logits; refuses
    models whose cache the running batch cannot splice."""
    import inspect

    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers):
        raise EngineError(f"{type(model).__name__} uses sliding-window or other special attention layers; "
                          "lorakit serve batches only decoders with full attention")
    params = inspect.signature(model.forward).parameters
    logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), logits


def _task_file(path: Path) -> dict:
    try:
        return read_task_info(path)
    except (ValueError, OSError):   # neither lorakit's task file nor PEFT's task_type: any task
        return {}


def _adapter_dirs(root: Path) -> dict[str, Path]:
    """Subdirectories of `root` holding an adapter config, under valid names."""
    found = {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if (path / CONFIG_NAME).is_file():
            if NAME_PATTERN.fullmatch(path.name) and set(path.name) != {"."}:
                found[path.name] = path
            else:
                log.warning("skipping %s: not a valid adapter name", path)
    return found


def _dir_task(root: Path) -> dict:
    """The task (and labels) of the first adapter in `root` that records one."""
    for path in _adapter_dirs(root).values():
        info = _task_file(path)
        if task_of(info):
            return {**info, "task": task_of(info)}
    return {}
