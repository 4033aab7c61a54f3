"""Merging ΔW into the base weights (no added latency) and taking LoRA out again."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .adapters import _require, active_adapters
from .inject import lora_configs, lora_layers, saved_modules, set_submodule


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Fold the active adapters (or `adapter_names`) into the base weights, in place.

    The forward then costs what the base costs. W0 is kept aside so `unmerge` is exact."""
    if adapter_names is not None:
        _require(model, adapter_names)
    _refuse_tied(model)
    for _, layer in lora_layers(model):
        layer.merge(adapter_names)
    return model


def _refuse_tied(model: nn.Module) -> None:
    """A weight shared with another module (input embeddings tied to the LM head) cannot take
    a merge: the other module would silently change too."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for path, layer in lora_layers(model):
        shared = owners.get(id(layer.weight), [])
        if len(shared) > 1:
            raise RuntimeError(f"cannot merge into {path}: its weight is tied to "
                               f"{', '.join(n for n in shared if not n.startswith(path + '.'))}, which "
                               "would change as well. Keep this adapter unmerged, or untie the weights first")


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the original base weights bit for bit."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The plain model with the active adapters merged: every wrapper replaced by its
    original module class (modules_to_save by the active adapter's copy), so transformers'
    save_pretrained/from_pretrained work on it without lorakit."""
    names = active_adapters(model)
    _refuse_tied(model)
    for name, layer in list(lora_layers(model)):
        layer.set_merged(names)
        layer._original_weight = None   # the merge is final: drop the copy kept for unmerge
        set_submodule(model, name, layer.base_layer)
    return _unload_wrappers(model)


def unload(model: nn.Module) -> nn.Module:
    """The original base model back, without any adapter (merged ones are unmerged)."""
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        set_submodule(model, name, wrapper.original_module)
    lora_configs(model).clear()
    return model


def _unload_wrappers(model: nn.Module) -> nn.Module:
    for name, wrapper in list(saved_modules(model)):
        set_submodule(model, name, wrapper.active_module())
    lora_configs(model).clear()
    return model
