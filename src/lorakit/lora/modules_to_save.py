"""Whole modules trained per adapter, beside the low-rank ones (PEFT's `modules_to_save`)."""

from __future__ import annotations

import copy

import torch.nn as nn
from torch import Tensor

from .mixed import MixedRows, per_adapter_rows


class ModulesToSave(nn.Module):
    """A module trained in full per adapter (e.g. a new classification head).

    Keeps `original_module` and a copy per adapter in `modules_to_save[name]`, as PEFT does;
    on disk the active copy is saved under the module's original name."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.mixed: MixedRows | None = None

    def add_adapter(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[name] = copy_
        self.active_adapter = self.active_adapter or name

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def active_module(self) -> nn.Module:
        return self.original_module if self.disabled else self.module_for(self.active_adapter)

    def module_for(self, name: str | None) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.mixed is None or self.mixed.uniform:
            name = self.active_adapter if self.mixed is None else self.mixed.only
            return self.module_for(name)(x, *args, **kwargs)
        # Heads are small: each adapter's copy runs on its own rows.
        return per_adapter_rows(
            self,
            x,
            self.original_module(x, *args, **kwargs),
            lambda name, xs, outs: self.modules_to_save[name](xs, *args, **kwargs),
        )
