"""Merging ΔW into the base weights (no added latency) and taking LoRA out again."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .adapters import active_adapters, require_adapters
from .exact import MergeError
from .inject import lora_configs, lora_layers, saved_modules, set_submodule, switchable_layers, token_layers
from .layers import LoraLayer


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = True) -> nn.Module:
    """Fold the active adapters (or `adapter_names`) into the base weights, in place.

    The forward then costs what the base costs. W0 is kept aside so `unmerge` is exact.
    With `safe_merge` (the default) an adapter with NaN/inf weights, or a merge that overflows
    the base dtype, raises MergeError and leaves every layer as it was."""
    if adapter_names is not None:
        require_adapters(model, adapter_names)
    _refuse_tied(model)
    _merge_all(
        model,
        lambda layer: [*layer.merged_adapters, *(layer.active_adapters if adapter_names is None else adapter_names)],
        safe_merge,
    )
    return model


def _merge_all(model: nn.Module, names_for: Callable[[LoraLayer], Sequence[str]], safe: bool) -> None:
    """Merge `names_for(layer)` into every layer, all or nothing: when one layer refuses (safe
    merge), the layers already merged are set back to what they held (bit-exact: W0 is kept)."""
    done: list[tuple[LoraLayer, list[str]]] = []
    try:
        for path, layer in [*lora_layers(model), *token_layers(model)]:
            before = list(layer.merged_adapters)
            try:
                layer.set_merged(dict.fromkeys(names_for(layer)), safe=safe)
            except MergeError as e:
                raise MergeError(f"cannot merge into {path}: {e}. Nothing was merged") from None
            done.append((layer, before))
    except MergeError:
        for layer, before in reversed(done):
            layer.set_merged(before, safe=False)
        raise


def _refuse_tied(model: nn.Module) -> None:
    """A weight shared with another module (input embeddings tied to the LM head) cannot take
    a merge: the other module would silently change too."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for path, layer in lora_layers(model):
        shared = owners.get(id(layer.weight), [])
        if len(shared) > 1:
            raise RuntimeError(
                f"cannot merge into {path}: its weight is tied to "
                f"{', '.join(n for n in shared if not n.startswith(path + '.'))}, which "
                "would change as well. Keep this adapter unmerged, or untie the weights first"
            )


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the original base weights bit for bit."""
    for layer in switchable_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = True) -> nn.Module:
    """The plain model with the active adapters merged: every wrapper replaced by its
    original module class (modules_to_save by the active adapter's copy), so transformers'
    save_pretrained/from_pretrained work on it without lorakit. `safe_merge` as in `merge`:
    on refusal the model keeps its adapters, unmerged."""
    names = active_adapters(model)
    _refuse_tied(model)
    if safe_merge:
        _refuse_non_finite_heads(model)
    # Merge everywhere first (all or nothing), then unwrap: a refused merge leaves the model as it was.
    _merge_all(model, lambda layer: names, safe_merge)
    for name, layer in reversed([*lora_layers(model), *token_layers(model)]):  # innermost first (nested wrappers)
        if isinstance(layer, LoraLayer):
            layer.exact.forget()  # the merge is final: drop the copy kept for unmerge
        set_submodule(model, name, layer.base_layer)
    return _unload_wrappers(model)


def _refuse_non_finite_heads(model: nn.Module) -> None:
    """The adapter's trained copies of whole modules (a new task head) become part of the model too."""
    for path, wrapper in saved_modules(model):
        for key, value in wrapper.active_module().state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise MergeError(
                    f"cannot merge: the adapter's copy of {path}.{key} holds NaN or infinite values; "
                    "refusing to merge a broken adapter. Nothing was merged"
                )


def unload(model: nn.Module) -> nn.Module:
    """The original base model back, without any adapter (merged ones are unmerged)."""
    for name, layer in reversed([*lora_layers(model), *token_layers(model)]):  # innermost first (nested wrappers)
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
