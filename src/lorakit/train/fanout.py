"""Scoring many adapters in one pass over the data: each batch goes through the model once, its
rows repeated once per adapter and routed by `mixed_batch` (block i through adapter i, or the
base), so k adapters cost one forward of k·b rows instead of k forwards of b.

The tasks' own evaluation code runs unchanged, once per adapter, in lockstep: each adapter's
evaluation sees an `AdapterView` of the model. Every evaluation asks for the same batches in
the same order, so at each call the views wait for one another; the last to arrive runs the
mixed batch and each takes its own block of the outputs back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..lora import mixed_batch

WAIT_S = 600.0  # a view waits this long for the others (a stuck evaluation fails the rest)


class Lockstep:
    """One forward for the k views' identical calls; see the module docstring."""

    def __init__(self, model: nn.Module, names: Sequence[str | None]) -> None:
        self.model, self.names = model, list(names)
        self.calls: list[dict | None] = [None] * len(names)
        self.outputs: list[Any] = [None] * len(names)
        self.barrier = threading.Barrier(len(names), action=self._run)

    def call(self, index: int, kwargs: dict) -> Any:
        self.calls[index] = kwargs
        try:
            self.barrier.wait(WAIT_S)
        except threading.BrokenBarrierError:
            raise RuntimeError("another adapter's evaluation failed; see its error") from None
        return self.outputs[index]

    def abort(self) -> None:
        self.barrier.abort()

    @torch.no_grad()
    def _run(self) -> None:
        first = self.calls[0]
        batch = first["input_ids"].shape[0] if "input_ids" in first else next(
            v.shape[0] for v in first.values() if isinstance(v, torch.Tensor))  # fmt: skip
        k = len(self.names)
        inputs = {key: value.repeat(k, *[1] * (value.dim() - 1)) if isinstance(value, torch.Tensor) else value
                  for key, value in first.items()}  # fmt: skip
        with mixed_batch(self.model, [name for name in self.names for _ in range(batch)]):
            out = self.model(**inputs)
        for i in range(k):
            self.outputs[i] = _block(out, i, k)


def _block(out: Any, i: int, k: int) -> Any:
    """Block i of k of `out` (a transformers ModelOutput): the inputs were k identical copies,
    so every batch-derived tensor (logits [k·b, ...], or [k·targets, vocab] when only the
    loss positions are kept) holds k equal blocks."""
    fields = {key: value.chunk(k)[i] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] % k == 0
              else value for key, value in out.items()}  # fmt: skip
    return type(out)(**fields)


class AdapterView(nn.Module):
    """The model as one adapter's evaluation sees it: its forward goes through the lockstep."""

    def __init__(self, model: nn.Module, lockstep: Lockstep, index: int) -> None:
        super().__init__()
        self.module = model  # tasks look through `.module` for the forward's arguments, as under DDP
        self.lockstep, self.index = lockstep, index

    @property
    def config(self):
        return self.module.config

    def forward(self, **kwargs: Any) -> Any:
        return self.lockstep.call(self.index, kwargs)


def in_lockstep(model: nn.Module, names: Sequence[str | None], run: Callable[[nn.Module], dict]) -> list[dict]:
    """`run(view)` for each adapter in `names` (None: the base), all in one pass; their results."""
    lockstep = Lockstep(model, names)
    results: list[Any] = [None] * len(names)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                results[i] = run(AdapterView(model, lockstep, i))
        except BaseException as e:  # noqa: BLE001 - re-raised below, once every view has stopped
            errors.append(e)
            lockstep.abort()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, RuntimeError)), errors[0])
    return results
