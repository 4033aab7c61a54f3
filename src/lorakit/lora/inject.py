"""Finding the modules to adapt, wrapping them, and freezing everything else.

Matching follows PEFT: a list entry matches a module path exactly or as a dotted suffix
("query" matches "bert.encoder.layer.0.attention.self.query"); a string is a regex that must
match the whole path; "all-linear" is every linear layer but the output head.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import regex
import torch.nn as nn

from .architectures import BLOCK_LISTS, DEFAULT_TARGETS
from .config import ConfigError, LoraConfig
from .layers import SUPPORTED_TYPE_NAMES, LoraLayer, is_linear, is_supported, wrap
from .modules_to_save import ModulesToSave


class TargetError(ValueError):
    """target_modules matched nothing, or something LoRA cannot wrap."""


@dataclass
class Target:
    """One module that LoRA would wrap, with the settings it gets."""

    name: str
    module: nn.Module
    r: int
    alpha: float
    slices: tuple[bool, ...] | None = None

    @property
    def kind(self) -> str:
        base = self.module.base_layer if isinstance(self.module, LoraLayer) else self.module
        return type(base).__name__


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    known = ", ".join(sorted(DEFAULT_TARGETS))
    raise TargetError(
        f"no default LoRA targets for model type {model_type!r} (known: {known}); "
        f"set target_modules, e.g. one of: {', '.join(candidate_names(model)) or '(none)'}"
    )


def name_matches(name: str, spec: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry matches exactly or
    as a dotted suffix."""
    if isinstance(spec, str):
        return _matches(spec, name)
    return any(name == t or name.endswith("." + t) for t in spec)


def pattern_value(name: str, patterns: dict, default):
    """rank_pattern / alpha_pattern lookup: the first key that matches the end of the path."""
    for key, value in patterns.items():
        if _matches(rf"(.*\.)?(?:{key})$", name):
            return value
    return default


# Patterns come from adapter_config.json files, which may be hostile: with `re`, a pattern such
# as "(.*.*)*$x" backtracks for hours on a module path. The `regex` package (a dependency of
# transformers) reads the same syntax, avoids most such blow-ups and times out the rest.
PATTERN_TIMEOUT_S = 1.0


def _matches(pattern: str, name: str) -> bool:
    try:
        return regex.fullmatch(pattern, name, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError as e:
        raise TargetError(
            f"the pattern {pattern!r} took over {PATTERN_TIMEOUT_S:g} s to match {name!r}; "
            "use module names or a simpler pattern"
        ) from e
    except regex.error as e:  # valid for `re` (checked in LoraConfig), not for `regex`
        raise TargetError(f"the pattern {pattern!r} is not a valid regular expression ({e})") from e


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    pattern = layers_pattern or list(BLOCK_LISTS)
    alternatives = "|".join(re.escape(p) for p in ([pattern] if isinstance(pattern, str) else pattern))
    m = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Module paths as the user sees them: a LoRA wrapper stands for its base layer, and
    nothing inside a wrapper is a candidate itself."""
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip = (name + ".",)
        yield name, module


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last path components of the layers LoRA can wrap (for error messages)."""
    names = {n.rsplit(".", 1)[-1] for n, m in _plain_modules(model) if n and _base(m) is not None}
    return sorted(names)


def _base(module: nn.Module) -> nn.Module | None:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return base if is_supported(base) else None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The modules `config` selects, in model order. Raises TargetError naming the model's
    candidate module names when nothing (or an unsupported layer) matches."""
    spec = config.target_modules if config.target_modules is not None else default_targets(model)
    head = _output_head(model)
    saved = config.modules_to_save or []
    targets, unsupported = [], []
    for name, module in _plain_modules(model):
        if not name or not _selected(name, module, spec, head):
            continue
        if _within(name, saved) or (config.exclude_modules and name_matches(name, config.exclude_modules)):
            continue
        if (
            config.layers_to_transform is not None
            and layer_index(name, config.layers_pattern) not in config.layers_to_transform
        ):
            continue
        if _base(module) is None:
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        targets.append(
            Target(
                name,
                module,
                r=pattern_value(name, config.rank_pattern, config.r),
                alpha=pattern_value(name, config.alpha_pattern, config.lora_alpha),
                slices=_slices(name, config),
            )
        )
    if unsupported:
        raise TargetError(
            f"target_modules={spec!r} matched modules LoRA cannot wrap: "
            f"{', '.join(unsupported[:5])}; supported layer types are "
            f"{', '.join(SUPPORTED_TYPE_NAMES)}. Target their sublayers instead, e.g. "
            f"{', '.join(candidate_names(model))}"
        )
    if not targets:
        raise TargetError(
            f"target_modules={spec!r} matched no module of this "
            f"{type(model).__name__}; candidate module names: {', '.join(candidate_names(model))}"
        )
    return targets


def _within(name: str, spec: list[str]) -> bool:
    """`name` or one of its ancestors matches `spec` (modules_to_save train in full: nothing
    inside them gets LoRA)."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), spec) for i in range(1, len(parts) + 1))


def _selected(name: str, module: nn.Module, spec: list[str] | str, head: nn.Module | None) -> bool:
    if spec == "all-linear":
        base = module.base_layer if isinstance(module, LoraLayer) else module
        return is_linear(base) and base is not head
    return name_matches(name, spec)


def _slices(name: str, config: LoraConfig) -> tuple[bool, ...] | None:
    mask = pattern_value(name, config.enable_lora or {}, None)
    return tuple(mask) if mask is not None else None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap the modules `config` selects with LoRA adapter `adapter_name`, in place.

    The base is frozen; only the new adapter (plus modules_to_save and the biases `config.bias`
    names) requires grad. Calling it again with another name adds a second adapter to the same
    wrappers. Returns the same model object."""
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
            )
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


def remove_adapter_modules(model: nn.Module, adapter_name: str) -> None:
    """Delete the adapter from every wrapper; a wrapper left with no adapter is replaced by
    the module it wraps, so deleting the last adapter restores the plain model."""
    for path, module in [*lora_layers(model), *saved_modules(model)]:
        if adapter_name in module.adapter_names:
            module.delete_adapter(adapter_name)
        if not module.adapter_names:
            original = module.base_layer if isinstance(module, LoraLayer) else module.original_module
            set_submodule(model, path, original)


def adapter_parameters(model: nn.Module) -> set[int]:
    """ids of every adapter's own parameters (A, B, modules_to_save copies), by module type."""
    ids = {id(p) for _, layer in lora_layers(model) for p in [*layer.lora_A.values(), *layer.lora_B.values()]}
    ids |= {id(p) for _, w in saved_modules(model) for p in w.modules_to_save.parameters()}
    return ids


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on everything that is not an adapter's own parameter."""
    own = adapter_parameters(model)
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)


def own_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """Adapter `adapter_name`'s own parameters: A and B of every layer, its head copies."""
    params = [
        p
        for _, layer in lora_layers(model)
        if adapter_name in layer.lora_A
        for p in (layer.lora_A[adapter_name], layer.lora_B[adapter_name])
    ]
    params += [
        p
        for _, w in saved_modules(model)
        if adapter_name in w.modules_to_save
        for p in w.modules_to_save[adapter_name].parameters()
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
    names = [n for n, _ in _plain_modules(model) if n and name_matches(n, config.modules_to_save)]
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


def dry_run(model: nn.Module, config: LoraConfig) -> str:
    """A table of the modules `config` would wrap (nothing is changed): path, layer type,
    weight shape, rank, alpha and adapter parameters, with the total."""
    rows, total = [], 0
    for t in find_targets(model, config):
        base = t.module.base_layer if isinstance(t.module, LoraLayer) else t.module
        probe = wrap(base)
        n_slices = sum(t.slices) if t.slices else 1
        (a, b) = probe._lora_shapes(t.r)
        params = n_slices * (math.prod(a) + math.prod(b) // (len(t.slices) if t.slices else 1))
        total += params
        shape = "x".join(map(str, base.weight.shape))
        note = f" slices={''.join('1' if s else '0' for s in t.slices)}" if t.slices else ""
        rows.append(f"{t.name:<60} {t.kind:<10} {shape:<12} r={t.r:<4} alpha={t.alpha:<6g} {params:>10,}{note}")
    return "\n".join(rows + [f"{len(rows)} modules, {total:,} adapter parameters"])
