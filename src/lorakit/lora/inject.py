"""Wrapping the modules an adapter config selects (targets.py), freezing everything else,
and the model's own registry of adapters (their configs, layers and trainable parameters)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch.nn as nn

from ..quantize import upgrade_nf4_layers
from .config import ConfigError, LoraConfig
from .dora import DORA
from .layers import LoraLayer
from .modules_to_save import ModulesToSave
from .parameters import LoraParameter
from .targets import ParameterTarget, TargetError, find_parameter_targets, find_targets, name_matches, plain_modules
from .tokens import TrainableTokens, tied_head, token_targets
from .variants import PLAIN
from .wrap import wrap


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap the modules `config` selects with LoRA adapter `adapter_name`, in place.

    The base is frozen; only the new adapter (plus modules_to_save and the biases `config.bias`
    names) requires grad. Calling it again with another name adds a second adapter to the same
    wrappers. Returns the same model object."""
    upgrade_nf4_layers(model)  # a bitsandbytes NF4 base trains right (and faster) on CPU
    add_adapter(model, config, adapter_name)
    set_trainable(model, adapter_name)
    return model


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Wrap and create adapter `adapter_name` without touching what trains (see `inject`)."""
    check_adapter_name(model, adapter_name)
    targets = find_targets(model, config)
    try:
        for t in targets:
            layer = wrap(t.module)
            if layer is not t.module:
                set_submodule(model, t.name, layer)
            layer.add_adapter(
                adapter_name,
                t.r,
                t.alpha,
                dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                init=config.init_lora_weights,
                slices=t.slices,
                variant=DORA if config.use_dora else PLAIN,
            )
        for t in find_parameter_targets(model, config):
            parameter_layer(model, t).add_adapter(
                adapter_name, t.r, t.alpha, dropout=config.lora_dropout, use_rslora=config.use_rslora,
                init=config.init_lora_weights,
            )  # fmt: skip
        if config.trainable_token_indices:
            add_token_rows(model, config.trainable_token_indices, adapter_name)
        for name in _modules_to_save_names(model, config):
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                set_submodule(model, name, module)
            module.add_adapter(adapter_name)
    except BaseException:
        remove_adapter_modules(model, adapter_name)  # roll back: the model is as it was
        raise
    lora_configs(model)[adapter_name] = config


def parameter_layer(model: nn.Module, target: ParameterTarget) -> LoraParameter:
    """The wrapper of `target`'s parameter: the one already there, or a new one around the
    module (outside the wrappers of its other parameters, as PEFT nests them)."""
    outer = model.get_submodule(target.path)
    module = outer
    while isinstance(module, LoraParameter):
        if module.parameter_name == target.parameter_name:
            return module
        module = module.base_layer
    layer = LoraParameter(outer, target.parameter_name)
    set_submodule(model, target.path, layer)
    return layer


def add_token_rows(model: nn.Module, spec: list[int] | dict[str, list[int]], adapter_name: str) -> None:
    """Trainable rows of the embedding (tokens.py), and of the output head that shares its weight."""
    for path, indices in token_targets(model, spec).items():
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer):
            raise ConfigError(f"trainable_token_indices: {path} is also a LoRA target; train its rows or adapt it "
                              "with LoRA, not both")  # fmt: skip
        if not isinstance(module, TrainableTokens):
            module = TrainableTokens(module)
            set_submodule(model, path, module)
        module.add_adapter(adapter_name, indices)
        head = tied_head(model, module.base_layer) if isinstance(module.base_layer, nn.Embedding) else None
        if head is not None:  # a tied output head reads the same rows
            wrapper = model.get_submodule(head)
            if not isinstance(wrapper, TrainableTokens):
                wrapper = TrainableTokens(wrapper, tied_to=module)
                set_submodule(model, head, wrapper)
            wrapper.add_adapter(adapter_name, indices)


def remove_adapter_modules(model: nn.Module, adapter_name: str) -> None:
    """Delete the adapter from every wrapper; a wrapper left with no adapter is replaced by
    the module it wraps, so deleting the last adapter restores the plain model. Innermost
    first: a nested wrapper's path runs through the one around it."""
    for path, module in reversed([*lora_layers(model), *saved_modules(model), *token_layers(model)]):
        if adapter_name in module.adapter_names or adapter_name in getattr(module, "active_adapters", ()):
            module.delete_adapter(adapter_name)
        if not module.adapter_names:
            original = module.original_module if isinstance(module, ModulesToSave) else module.base_layer
            set_submodule(model, path, original)


def adapter_parameters(model: nn.Module) -> set[int]:
    """ids of every adapter's own parameters (A, B, modules_to_save copies), by module type."""
    ids = {id(p) for _, layer in lora_layers(model) for name in layer.adapter_names for p in layer.own_parameters(name)}
    ids |= {id(p) for _, w in saved_modules(model) for p in w.modules_to_save.parameters()}
    ids |= {id(p) for _, t in token_layers(model) for name in t.adapter_names for p in t.own_parameters(name)}
    return ids


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on everything that is not an adapter's own parameter."""
    own = adapter_parameters(model)
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)


def own_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """Adapter `adapter_name`'s own parameters: A and B of every layer (and its variant's,
    DoRA's magnitude), its head copies."""
    params = [
        p for _, layer in lora_layers(model) if adapter_name in layer.lora_A for p in layer.own_parameters(adapter_name)
    ]
    params += [
        p
        for _, w in saved_modules(model)
        if adapter_name in w.modules_to_save
        for p in w.modules_to_save[adapter_name].parameters()
    ]
    params += [
        p for _, t in token_layers(model) if adapter_name in t.adapter_names for p in t.own_parameters(adapter_name)
    ]
    return params


def freeze_adapter(model: nn.Module, adapter_name: str) -> None:
    """Stop adapter `adapter_name`'s own parameters (A, B, head copies) from training."""
    for p in own_parameters(model, adapter_name):
        p.requires_grad_(False)


def check_adapter_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ConfigError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' and '-' "
            "(it becomes a parameter name and a directory name)"
        )
    if name in lora_configs(model):
        raise ConfigError(
            f"the model already has an adapter named {name!r}; "
            "delete it (lorakit.delete_adapter) or choose another adapter_name"
        )


def _modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in plain_modules(model) if n and name_matches(n, config.modules_to_save)]
    if not names:
        raise TargetError(
            f"modules_to_save={config.modules_to_save!r} matched no module; top-level "
            f"modules are: {', '.join(n for n, _ in model.named_children())}"
        )
    # A match inside another match (classifier.dense inside classifier) is covered by its parent.
    return [n for n in names if not any(n.startswith(p + ".") for p in names)]


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters injected into `model`, by adapter name."""
    if "lorakit_configs" not in model.__dict__:
        model.__dict__["lorakit_configs"] = {}
    return model.__dict__["lorakit_configs"]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def token_layers(model: nn.Module) -> Iterator[tuple[str, TrainableTokens]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokens))


def switchable_layers(model: nn.Module) -> list[LoraLayer | TrainableTokens]:
    """Every wrapper whose adapters are switched, disabled, mixed per row and merged alike."""
    return [m for _, m in lora_layers(model)] + [m for _, m in token_layers(model)]


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave))


def bias_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Parameter paths of the biases that train (and are saved) with this config."""
    if config.bias == "none":
        return []
    if config.bias == "all":
        return [
            n
            for n, _ in model.named_parameters()
            if n.endswith("bias")
            and ".lora_" not in n
            and ".modules_to_save." not in n
            and ".original_module." not in n
        ]
    return [f"{n}.base_layer.bias" for n, m in lora_layers(model) if getattr(m.base_layer, "bias", None) is not None]


def set_trainable(model: nn.Module, adapter_name: str) -> None:
    """Only adapter `adapter_name` trains: its A and B, its modules_to_save copies and the
    biases its config names. Set through requires_grad, by module type, not by parameter name."""
    model.requires_grad_(False)
    for p in own_parameters(model, adapter_name):
        p.requires_grad_(True)
    config = lora_configs(model).get(adapter_name)
    if config is not None:
        for name in bias_names(model, config):
            model.get_parameter(name).requires_grad_(True)
