"""Mixed-adapter batches: row i of the batch runs through adapter `adapter_names[i]`."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .adapters import _require
from .inject import lora_layers, saved_modules
from .layers import MixedRows


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every forward uses adapter `adapter_names[i]` (None: the base
    alone). Each LoRA layer stacks the adapters once and does one gathered batched matmul, so
    the cost does not grow with the number of distinct adapters. Works under autograd
    (training several adapters at once) and under `generate` (rows repeated for beams or
    num_return_sequences follow their prompt)."""
    names = tuple(dict.fromkeys(n for n in adapter_names if n is not None))
    _require(model, names)
    slot = {n: i for i, n in enumerate(names)}
    index = torch.tensor([slot[n] if n is not None else len(names) for n in adapter_names], dtype=torch.long)
    rows = MixedRows(names, index)
    modules = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    for module in modules:
        module.mixed = rows
    try:
        yield model
    finally:
        for module in modules:
            module.mixed = None
