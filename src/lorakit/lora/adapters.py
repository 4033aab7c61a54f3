"""Many adapters on one base: activate, disable, delete, mix per row, combine, count."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from . import functional as LF
from .config import ConfigError, LoraConfig
from .inject import (
    check_adapter_name,
    lora_configs,
    lora_layers,
    remove_adapter_modules,
    saved_modules,
    set_trainable,
    switchable_layers,
)
from .mixed import MixedRows
from .principal import is_weight_init


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter injected into or loaded onto `model`, in the order they were added."""
    return list(lora_configs(model))


def require_adapters(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    missing = [n for n in names if n not in known]
    if missing:
        have = known or "no adapters (use lorakit.inject or load_adapter)"
        raise KeyError(f"unknown adapter(s) {missing}; the model has: {have}")


def active_adapters(model: nn.Module) -> list[str]:
    for layer in switchable_layers(model):
        return list(layer.active_adapters)
    return []


def set_adapter(model: nn.Module, names: str | Sequence[str], *, trainable: bool = False) -> None:
    """Activate one adapter, or several (their updates are summed). Switching touches no
    weights (unless something is merged): it only changes which A, B each layer reads."""
    names = [names] if isinstance(names, str) else list(names)
    require_adapters(model, names)
    for layer in switchable_layers(model):
        if layer.merged_adapters and set(layer.merged_adapters) != set(names):
            layer.set_merged(names)  # keep a merged model merged with what is now active
        layer.active_adapters = names
    for _, wrapper in saved_modules(model):
        wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)
    if trainable:
        set_trainable(model, names[0])


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block (merged adapters are unmerged meanwhile)."""
    layers = switchable_layers(model) + [w for _, w in saved_modules(model)]
    merged = {id(layer): list(getattr(layer, "merged_adapters", [])) for layer in layers}
    for layer in layers:
        if merged[id(layer)]:
            layer.set_merged([])
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            if merged[id(layer)]:
                layer.set_merged(merged[id(layer)])


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every forward uses adapter `adapter_names[i]` (None: the base
    alone). Each LoRA layer stacks the adapters once and does one gathered batched matmul, so
    the cost does not grow with the number of distinct adapters. Works under autograd
    (training several adapters at once) and under `generate` (rows repeated for beams or
    num_return_sequences follow their prompt)."""
    names = tuple(dict.fromkeys(n for n in adapter_names if n is not None))
    require_adapters(model, names)
    slot = {n: i for i, n in enumerate(names)}
    index = torch.tensor([slot[n] if n is not None else len(names) for n in adapter_names], dtype=torch.long)
    rows = MixedRows(names, index)
    modules = switchable_layers(model) + [m for _, m in saved_modules(model)]
    for module in modules:
        module.mixed = rows
    try:
        yield model
    finally:
        for module in modules:
            module.mixed = None


def delete_adapter(model: nn.Module, name: str) -> None:
    require_adapters(model, [name])
    remove_adapter_modules(model, name)
    del lora_configs(model)[name]


@dataclass
class ParameterCount:
    trainable: int
    total: int
    adapter: int  # every adapter's own parameters: A and B (what the paper counts), DoRA's magnitude

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f} || adapter params: {self.adapter:,}"
        )


def count_parameters(model: nn.Module, adapter_name: str | None = None) -> ParameterCount:
    """Trainable and total parameters; `adapter` counts the LoRA layers' adapter parameters
    (A, B, DoRA's magnitude; of one adapter if named). Total counts each parameter once (the
    base plus every adapter)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    adapter = sum(
        p.numel()
        for layer in switchable_layers(model)
        for name in layer.adapter_names
        if adapter_name in (None, name)
        for p in layer.own_parameters(name)
    )
    return ParameterCount(
        trainable=sum(p.numel() for p in seen.values() if p.requires_grad),
        total=sum(p.numel() for p in seen.values()),
        adapter=adapter,
    )


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: Literal["cat", "svd"] = "cat",
    svd_rank: int | None = None,
) -> None:
    """A new adapter whose update is Σ wᵢ·ΔWᵢ.

    "cat" is exact: A = [A₁; A₂; ...], B = [w₁s₁B₁, w₂s₂B₂, ...] (rank Σrᵢ, scaling 1).
    "svd" truncates Σ wᵢ·ΔWᵢ to rank `svd_rank` (default: the largest input rank) with a
    truncated SVD, the best rank-k approximation; the singular values are split evenly
    between B and A."""
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if combination not in ("cat", "svd"):
        raise ValueError(f"combination={combination!r}: use 'cat' (exact) or 'svd' (truncated to svd_rank)")
    require_adapters(model, adapters)
    check_adapter_name(model, adapter_name)
    configs = lora_configs(model)
    dora = [a for a in adapters if configs[a].use_dora]
    if dora:
        raise ConfigError(
            f"adapter(s) {dora} are DoRA: a magnitude rescales each one's weight, so their factors do not add up; "
            "merge them one at a time (lorakit.merge) or mix them per row (mixed_batch)"
        )
    residual = [a for a in configs if is_weight_init(configs[a].init_lora_weights)]
    if residual:
        raise ConfigError(
            f"adapter(s) {residual} left a PiSSA/OLoRA residual in the base weights, which a combined adapter would "
            "be added to; save them (plain LoRA, the default), reload on a fresh base, and combine those"
        )
    first = configs[adapters[0]]
    rank = svd_rank or max(c.r for c in (configs[a] for a in adapters))
    for _, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if present:
            A, B = _combine_layer(layer, present, combination, rank)
            layer.set_adapter_weights(adapter_name, A, B, scaling=1.0)
    # Wrapper heads (modules_to_save): the weighted average of the heads' parameters.
    for _, wrapper in saved_modules(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in wrapper.modules_to_save]
        if present:
            wrapper.add_adapter(adapter_name)
            _average_into(wrapper.modules_to_save[adapter_name], [(wrapper.modules_to_save[a], w) for a, w in present])
    # Scaling is 1 everywhere: alpha = r (rank_pattern/alpha_pattern per layer are written on save).
    r = rank if combination == "svd" else sum(configs[a].r for a in adapters)
    configs[adapter_name] = first.replace(
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        enable_lora=None,
        target_modules=_union_targets(configs, adapters),
    )
    set_trainable(model, active_adapters(model)[0] if active_adapters(model) else adapter_name)


def _combine_layer(layer, present, combination: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    terms = [(layer.A_matrix(a), layer.B_matrix(a), w * layer.scaling[a]) for a, w in present]
    return LF.combine_factors(terms, combination, rank)


@torch.no_grad()
def _average_into(target: nn.Module, sources: list[tuple[nn.Module, float]]) -> None:
    for name, param in target.named_parameters():
        param.copy_(sum(w * src.get_parameter(name).float() for src, w in sources).to(param.dtype))


def _union_targets(configs: dict[str, LoraConfig], adapters: Sequence[str]) -> list[str] | str | None:
    specs = [configs[a].target_modules for a in adapters]
    if all(isinstance(s, list) for s in specs):
        return sorted({t for s in specs for t in s})
    if len({str(s) for s in specs}) == 1:
        return specs[0]
    raise ConfigError(
        "cannot combine adapters whose target_modules differ in form "
        f"({specs}); retrain them with the same target_modules"
    )
