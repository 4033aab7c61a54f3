"""Which modules an adapter config selects, with the rank and alpha each gets.

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

from ..models import output_head
from .architectures import BLOCK_LISTS, DEFAULT_TARGETS
from .config import LoraConfig
from .layers import LoraLayer
from .modules_to_save import ModulesToSave
from .wrap import SUPPORTED_TYPE_NAMES, is_linear, is_supported, wrap


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


def plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
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
    names = {n.rsplit(".", 1)[-1] for n, m in plain_modules(model) if n and _base(m) is not None}
    return sorted(names)


def _base(module: nn.Module) -> nn.Module | None:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return base if is_supported(base) else None


def module_spec(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """target_modules, or the architecture's default when it is None (and no parameters are
    targeted instead: PEFT's rule)."""
    if config.target_modules is not None:
        return config.target_modules
    return [] if config.target_parameters else default_targets(model)


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The modules `config` selects, in model order. Raises TargetError naming the model's
    candidate module names when nothing (or an unsupported layer) matches."""
    spec = module_spec(model, config)
    if spec == [] and config.target_parameters:
        return []  # only parameters are adapted (find_parameter_targets)
    head = output_head(model)
    saved = config.modules_to_save or []
    targets, unsupported = [], []
    for name, module in plain_modules(model):
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
        # A quantised weight is stored packed: show the layer's [out, in] and its storage type.
        shape = (
            f"{probe.fan_out}x{probe.fan_in} {base.weight.dtype}"
            if probe.quantized
            else "x".join(map(str, base.weight.shape))
        )
        note = f" slices={''.join('1' if s else '0' for s in t.slices)}" if t.slices else ""
        rows.append(f"{t.name:<60} {t.kind:<10} {shape:<12} r={t.r:<4} alpha={t.alpha:<6g} {params:>10,}{note}")
    for t in find_parameter_targets(model, config):  # A: [E·r, in], B: [out, E·r]
        experts = t.shape[0] if len(t.shape) == 3 else 1
        params = experts * t.r * (t.shape[-1] + t.shape[-2])
        total += params
        kind = f"{experts} experts" if len(t.shape) == 3 else "parameter"
        shape = "x".join(map(str, t.shape))
        rows.append(f"{t.key:<60} {kind:<10} {shape:<12} r={t.r:<4} alpha={t.alpha:<6g} {params:>10,}")
    return "\n".join(rows + [f"{len(rows)} targets, {total:,} adapter parameters"])


@dataclass
class ParameterTarget:
    """One parameter LoRA would adapt (target_parameters): `key` = module path + parameter name."""

    key: str
    path: str  # where its module sits in the model (wrapped or not)
    parameter_name: str
    shape: tuple[int, ...]
    r: int
    alpha: float


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[ParameterTarget]:
    """The parameters `config.target_parameters` selects (a path, or its dotted suffix, as PEFT
    matches them), in model order; each module's parameters in its own order."""
    if not config.target_parameters:
        return []
    from .parameters import LoraParameter

    targets = []
    for path, module in plain_modules(model):
        holder = module
        while isinstance(holder, LoraParameter):
            holder = holder.base_layer
        if isinstance(holder, LoraLayer):
            continue  # a layer adapted through target_modules: its weight is not a free parameter
        for name, param in holder.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            if not name_matches(key, config.target_parameters):
                continue
            if not path or param.dim() not in (2, 3):
                raise TargetError(
                    f"target_parameters matched {key} ({param.dim()}-D, "
                    f"{'on the top-level model' if not path else 'shape ' + str(tuple(param.shape))}); LoRA adapts "
                    "2-D and 3-D (expert) parameters of a submodule"
                )
            r = pattern_value(key, config.rank_pattern, config.r)
            alpha = pattern_value(key, config.alpha_pattern, config.lora_alpha)
            targets.append(ParameterTarget(key, path, name, tuple(param.shape), r, alpha))
    if not targets:
        raise TargetError(
            f"target_parameters={config.target_parameters!r} matched no parameter of this {type(model).__name__}; "
            f"its 3-D (expert) parameters: {', '.join(expert_names(model)) or '(none)'}"
        )
    return targets


def expert_names(model: nn.Module) -> list[str]:
    """The short names of a model's 3-D parameters ("mlp.experts.gate_up_proj"): what
    target_parameters usually names."""
    names = (n.replace(".base_layer", "") for n, p in model.named_parameters() if p.dim() == 3)
    return sorted({".".join(n.split(".")[-3:]) for n in names})


def split_targets(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """`names` (module names, or paths ending in a parameter's name) as (target_modules,
    target_parameters): an entry that names no module but a parameter of one is a parameter
    (`mlp.experts.gate_up_proj`: a fused MoE expert weight)."""
    modules = [n for n, _ in plain_modules(model) if n]
    parameters = [n.replace(".base_layer", "") for n, _ in model.named_parameters()]
    is_parameter = {t: not any(name_matches(m, [t]) for m in modules) and any(name_matches(p, [t]) for p in parameters)
                    for t in names}  # fmt: skip
    return [t for t in names if not is_parameter[t]], [t for t in names if is_parameter[t]]
