"""Many adapters on one frozen base model: the scheduler behind `lorakit serve`, usable
without HTTP.

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
  (batch.py), then runs ONE decode step for every running row under `mixed_batch`: row i
  goes through its own adapter, one gathered matmul per layer. Rows leave after any step,
  new ones join before any step. With `mixed=False` (the baseline of the load test) a batch
  only ever holds one adapter and switches between requests.
* The adapters (known, loaded, held by requests, evicted) are the registry's (registry.py);
  choosing tokens and stop strings is sampling.py's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..lora import disable_adapters, mixed_batch, set_adapter
from ..train.tasks import chat_text
from .batch import DecoderStep, RunningBatch, context_length, eos_ids
from .errors import Busy, EngineError, Internal, Timeout
from .jobs import EngineConfig, EngineEvents, Event, Job, Sampling
from .registry import AdapterRegistry, dir_task
from .sampling import TextTail, next_tokens, prompt_logprobs, request_generator

log = logging.getLogger("lorakit.serve")

TASKS = ("causal-lm", "classification")
_STOP = object()


@dataclass
class _Command:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


class Engine:
    """One base model, many adapters, one worker thread. See the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        task: str,
        adapters_dir: str | Path,
        *,
        name: str,
        aliases: Iterable[str] = (),
        config: EngineConfig | None = None,
        events: EngineEvents | None = None,
    ) -> None:
        if task not in TASKS:
            raise EngineError(f"lorakit serve serves {' and '.join(TASKS)} models, not {task!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.name = name
        self.config = config or EngineConfig()
        self.registry = AdapterRegistry(
            model,
            task,
            adapters_dir,
            name=name,
            base_names={name, *aliases},
            max_adapters=self.config.max_adapters,
            allow_any_path=self.config.allow_any_path,
            events=events,
        )
        self.max_context = context_length(model, tokenizer)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self._text = TextTail(self._decode_text, eos_ids(model, tokenizer), self.max_context)
        self._step = DecoderStep(model, tokenizer.pad_token_id or 0) if task == "causal-lm" else None
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._batch: RunningBatch | None = None
        self._admitted: list[Job] = []  # taken from the queue this turn, maybe not yet in the batch
        self._worker: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        adapters_dir: str | Path,
        *,
        task: str | None = None,
        served_name: str | None = None,
        config: EngineConfig | None = None,
        quantize: str | None = None,
        bf16: bool = False,
    ) -> Engine:
        """Load `model` (alias, path or hub id) with the head its adapters need. The task is
        `task`, else the one the adapters in `adapters_dir` record, else causal-lm. The base is
        held in bf16 and its linear layers quantised (nf4 | int8 | gguf) if asked."""
        from ..models import load_tokenizer
        from ..train.api import load_base

        adapters_dir = Path(adapters_dir)
        if not adapters_dir.is_dir():
            raise FileNotFoundError(f"adapters dir {adapters_dir} does not exist")
        found = dir_task(adapters_dir)
        task = task or found.get("task") or "causal-lm"
        labels = found.get("labels") if found.get("task") == task else None
        base = load_base(model, task, labels or (), quantize=quantize, bf16=bf16)
        return cls(
            base, load_tokenizer(model), task, adapters_dir, name=served_name or model, aliases=[model], config=config
        )

    @property
    def events(self) -> EngineEvents:
        return self.registry.events

    @events.setter
    def events(self, events: EngineEvents) -> None:
        self.registry.events = events

    @property
    def adapters_dir(self) -> Path:
        return self.registry.adapters_dir

    @property
    def base_names(self) -> set[str]:
        return self.registry.base_names

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
        if self._watcher is not None:  # first: a scan in progress still needs the worker
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
        return self.registry.resolve(model)

    def model_names(self) -> list[str]:
        return self.registry.model_names()

    def adapters(self) -> list[dict]:
        """Every known adapter: name, path, whether loaded, requests holding it."""
        return self.registry.adapters()

    def loaded_names(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return self.registry.loaded_names()

    def load(self, name: str, path: str | Path) -> bool:
        """Load (or replace: True) adapter `name` from `path`; a relative path is taken inside
        the adapters dir, and any path must resolve inside it unless `allow_any_path`.
        Requests running on the old version finish on it."""
        resolved, from_dir = self.registry.checked_path(name, path)
        return self._call(lambda: self.registry.install(name, resolved, from_dir))

    def unload(self, name: str) -> None:
        """Forget adapter `name`. Requests using it finish first; an adapter of the adapters
        dir stays unloaded until its files change or it is loaded again."""
        self._call(lambda: self.registry.remove(name, remember=True))

    def scan(self) -> dict[str, list[str]]:
        """One pass of the directory watch: load new subdirectories, reload changed ones,
        unload vanished ones. Returns the names per action."""
        done: dict[str, list[str]] = {"loaded": [], "replaced": [], "removed": [], "failed": []}
        installs, removals = self.registry.changes()
        for name, path, fingerprint in installs:
            try:
                replaced = self._call(lambda n=name, p=path: self.registry.install(n, p, True))
                done["replaced" if replaced else "loaded"].append(name)
            except Busy:
                pass  # every slot is in use: try again on the next pass
            except EngineError as e:
                log.warning("adapter %s not served: %s", name, e)
                self.registry.skip_until_changed(name, fingerprint)
                done["failed"].append(name)
        for name in removals:
            self._call(lambda n=name: self.registry.remove(n, False))
            done["removed"].append(name)
        return done

    # -- requests: public --------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """The chat template where the tokenizer has one; else the contents, one per line
        (as lorakit's causal-lm training formats a prompt: `train.tasks.chat_text`)."""
        with self._tokenizer_lock:
            return self.tokenizer(chat_text(self.tokenizer, messages), add_special_tokens=False)["input_ids"]

    def generation_jobs(
        self, prompts: Sequence[list[int]], adapter: str | None, sampling: Sampling, n: int = 1
    ) -> list[Job]:
        """`n` jobs per tokenized prompt (choice index = prompt·n + k, OpenAI's order; a seeded
        request's k-th choice samples with seed + k); refuses what cannot fit the context or caps."""
        self._require_task("causal-lm", "/v1/completions or /v1/chat/completions")
        if not 1 <= len(prompts) * n <= self.config.max_batch_size:
            raise EngineError(
                f"give 1 to {self.config.max_batch_size} choices per request (prompts x n), not {len(prompts) * n}"
            )
        if sampling.max_tokens is not None and sampling.max_tokens > self.config.max_tokens:
            raise EngineError(f"max_tokens={sampling.max_tokens} exceeds this server's cap of {self.config.max_tokens}")
        jobs = []
        for i, ids in enumerate(prompts):
            room = self.max_context - len(ids)
            wanted = sampling.max_tokens if sampling.max_tokens is not None else min(self.config.max_tokens, room)
            if not ids:
                raise EngineError(f"prompt {i} is empty")
            if not all(0 <= t < self.vocab_size for t in ids):
                raise EngineError(f"prompt {i} holds token ids outside the vocabulary (0 to {self.vocab_size - 1})")
            if room < 0 or wanted > room or (wanted > 0 and room < 1):
                raise EngineError(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={wanted} that exceeds "
                    f"the model's context of {self.max_context} tokens"
                )
            for k in range(n):
                own = sampling.replace(max_tokens=wanted, seed=None if sampling.seed is None else sampling.seed + k)
                jobs.append(
                    Job(adapter, i * n + k, prompt_ids=list(ids), sampling=own, generator=request_generator(own))
                )
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
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
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

    def generate(
        self, prompts: Sequence[str], adapters: Sequence[str | None] | str | None = None, **sampling: Any
    ) -> list[Event]:
        """Blocking convenience: continue each prompt (raw text) with its adapter (one for
        all, or one per prompt; None: the base), greedy unless `temperature` is given."""
        names = adapters if isinstance(adapters, (list, tuple)) else [adapters] * len(prompts)
        jobs = [
            job
            for prompt, name in zip(prompts, names)
            for job in self.generation_jobs(
                [self.encode_prompt(prompt)], self.resolve(name) if name else None, Sampling(**sampling)
            )
        ]
        for i, job in enumerate(jobs):
            job.index = i
        return self.run(jobs)

    def classify(self, texts: Sequence[str], adapter: str | None = None) -> list[dict]:
        """Blocking convenience: label and scores per text."""
        name = self.resolve(adapter) if adapter else None
        return [event.result for event in self.run(self.classification_jobs(texts, name))]

    def stats(self) -> dict[str, int]:
        batch = self._batch  # read once: the worker may replace it meanwhile
        return {**self.registry.counts(), "waiting": len(self._waiting), "running": len(batch.jobs) if batch else 0}

    # -- helpers for the public API ----------------------------------------------------------
    def _require_task(self, task: str, endpoint: str) -> None:
        if self.task != task:
            raise EngineError(f"this server serves a {self.task} model; {endpoint} needs a {task} model")

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
            except Exception:  # the watch must outlive a bad pass (a dir removed mid-scan, ...)
                log.exception("adapter directory scan failed")

    def _decode_text(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def decode(self, tokens: list[int]) -> str:
        """Token ids as text, special tokens kept (an echoed prompt, a token's own text)."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def tokenizer_info(self) -> dict:
        t = self.tokenizer
        return {
            "tokenizer_class": type(t).__name__,
            "vocab_size": self.vocab_size,
            "model_max_length": self.max_context,
            **{key: getattr(t, key, None) for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "add_bos_token": getattr(t, "add_bos_token", None),
            "chat_template": getattr(t, "chat_template", None),
        }

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
            except Exception as e:  # a failed forward fails its batch; the server keeps serving
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
                except Exception as e:  # the caller gets it, the worker carries on
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
                if not self.registry.acquire(job):
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
        return Timeout(
            f"the request took longer than {self.config.request_timeout_s:g} s ({len(job.tokens)} tokens generated)"
        )

    def _end(self, job: Job, error: EngineError | None) -> None:
        self.registry.release(job)
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
        set_adapter(self.model, ids[0])  # baseline: one adapter per batch, switched per batch
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

    def _prefill(self, jobs: list[Job]) -> RunningBatch | None:
        self.events.on_batch("prefill", len(jobs))
        scoring = [j.sampling.echo and j.sampling.logprobs is not None for j in jobs]
        with self._adapters_for(jobs):
            mask, cache, logits = self._step.prefill(jobs, every_position=any(scoring))
        if any(scoring):  # the echoed prompts' own tokens, scored (the rows are left-padded)
            width = logits.shape[1]
            for job, row, wanted in zip(jobs, logits, scoring):
                if wanted:
                    own = row[width - len(job.prompt_ids) :]
                    job.logprobs = prompt_logprobs(job.prompt_ids, own, job.sampling.logprobs)
            logits = logits[:, -1].float()
        return self._advance(RunningBatch(list(jobs), cache, mask, next_tokens(jobs, logits)))

    def _decode(self) -> None:
        batch = self._batch
        self.events.on_batch("decode", len(batch.jobs))
        with self._adapters_for(batch.jobs):
            logits = self._step.decode(batch)
        batch.next = next_tokens(batch.jobs, logits)
        self._batch = self._advance(batch)

    def _advance(self, batch: RunningBatch) -> RunningBatch | None:
        """Give each row its new token; finished rows leave the batch."""
        keep = []
        for i, (job, token) in enumerate(zip(batch.jobs, batch.next.tolist())):
            if job.sampling.max_tokens == 0:  # scoring the prompt alone (echo): nothing to generate
                job.pending = None
                self._finish(job, "length")
                continue
            delta, reason = self._text.add(job, token)
            if reason is None:
                keep.append(i)
                if delta:
                    job.send(Event(job.index, delta=delta))
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

    def _finish(self, job: Job, reason: str) -> None:
        self.registry.release(job)
        job.send(
            Event(
                job.index,
                delta=job.output[job.sent :],
                finish_reason=reason,
                text=job.output,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(job.tokens),
                logprobs=job.logprobs if job.sampling.logprobs is not None else None,
                prompt_ids=job.prompt_ids if job.sampling.echo else None,
            )
        )

    # -- classification ----------------------------------------------------------------------
    @torch.no_grad()
    def _classify_step(self) -> None:
        jobs = self._admit(self.config.max_batch_size)
        if not jobs:
            return
        with self._tokenizer_lock:
            enc = self.tokenizer(
                [j.text for j in jobs], padding=True, truncation=True, max_length=self.max_context, return_tensors="pt"
            )
        self.events.on_batch("classify", len(jobs))
        with self._adapters_for(jobs):
            probs = self.model(**enc).logits.float().softmax(-1)
        for job, row in zip(jobs, probs.tolist()):
            labels = self._labels(job.slot, len(row))
            best = max(range(len(row)), key=row.__getitem__)
            self.registry.release(job)
            job.send(
                Event(job.index, finish_reason="stop", result={"label": labels[best], "scores": dict(zip(labels, row))})
            )

    def _labels(self, slot, count: int) -> list[str]:
        if slot is not None and len(slot.labels) == count:
            return slot.labels
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(count)]
