"""The registry of methods, applying one to a model, and counting its parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .. import lora
from ..lora.inject import bias_names, lora_configs, saved_modules
from ..lora.targets import split_targets
from ..models import portable_name
from . import adapters, full
from .errors import MethodError
from .prefix import PrefixModel


@dataclass(frozen=True)
class Method:
    summary: str
    options: tuple[str, ...] = ()  # the TrainConfig fields it is built from


METHODS: dict[str, Method] = {
    "lora": Method("LoRA: low-rank updates of Wq, Wv (or --targets); PEFT's adapter format (the default)"),
    "full": Method("full fine-tuning: every parameter"),
    "top2": Method("FT-Top2: the last two transformer blocks (of each stack)"),
    "bitfit": Method("BitFit: bias terms only"),
    "adapter-h": Method("Houlsby adapters after the attention output and the MLP of every block", ("adapter_size",)),
    "adapter-l": Method("Lin adapter after the MLP of every block, with its own LayerNorm", ("adapter_size",)),
    "adapter-p": Method("Pfeiffer adapter after the MLP of every block (ReLU, no LayerNorm)", ("adapter_size",)),
    "adapter-drop": Method(
        "AdapterDrop: Houlsby adapters, none in the lowest --adapter-drop-layers blocks",
        ("adapter_size", "adapter_drop_layers"),
    ),
    "prefix-embed": Method("trainable prefix token embeddings before the input", ("prefix_length", "task")),
    "prefix-layer": Method("trainable prefix keys and values in every attention layer", ("prefix_length", "task")),
}

# How each non-LoRA method changes a frozen model; returns the model to call (the same one,
# or a wrapper around it).
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "full": full.train_all,
    "top2": lambda model: full.train_top(model, blocks=2),
    "bitfit": full.train_biases,
    "adapter-h": lambda model, adapter_size: adapters.add_adapters(model, "houlsby", adapter_size),
    "adapter-l": lambda model, adapter_size: adapters.add_adapters(model, "lin", adapter_size),
    "adapter-p": lambda model, adapter_size: adapters.add_adapters(model, "pfeiffer", adapter_size),
    "adapter-drop": lambda model, adapter_size, adapter_drop_layers: adapters.add_adapters(
        model, "drop", adapter_size, adapter_drop_layers
    ),
    "prefix-embed": lambda model, prefix_length, task: PrefixModel(model, "embed", prefix_length, task),
    "prefix-layer": lambda model, prefix_length, task: PrefixModel(model, "layer", prefix_length, task),
}

SPEC_KEY = "lorakit_method"
PAPER_COUNT_NOTE = (
    "paper_count: the trainable parameters without the task head, as the LoRA paper counts them; "
    "head: the freshly initialised task head, trained by every method"
)


@dataclass
class MethodSpec:
    """What a non-LoRA method did to a model: enough to rebuild it on a fresh base."""

    name: str
    settings: dict[str, Any]  # e.g. {"adapter_size": 16}
    head_modules: list[str]  # new task-head modules of the base model, trained in full
    params: list[str]  # names of the parameters the method trains (and saves)
    head_params: list[str]  # those of them in the head


def method_spec(model: nn.Module) -> MethodSpec | None:
    """The non-LoRA method applied to `model`; None for LoRA (or nothing)."""
    return model.__dict__.get(SPEC_KEY)


def unknown_method(name: str) -> MethodError:
    return MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")


def apply_method(model: nn.Module, config, new_modules: Sequence[str], token_rows=None) -> nn.Module:
    """Set `model` up for training with `config.method` (a TrainConfig); returns the model to
    train, which is `model` itself except for prefix methods (a PrefixModel around it). The
    new task-head modules `new_modules` train in every method; `token_rows` (LoRA): the
    embedding rows of added tokens that train too (trainable_token_indices)."""
    if config.method == "lora":
        return lora.inject(model, lora_config(config, new_modules, model).replace(trainable_token_indices=token_rows))
    if config.method not in METHODS:
        raise unknown_method(config.method)
    if config.method == "prefix-embed" and config.eval_generate:
        raise MethodError(
            f"{config.method} cannot generate text; drop --eval-generate (loss and perplexity are still "
            "scored), or use prefix-layer"
        )
    settings = {option: getattr(config, option) for option in METHODS[config.method].options}
    return build(model, config.method, settings, new_modules)


def lora_config(config, new_modules: Sequence[str], model: nn.Module | None = None) -> lora.LoraConfig:
    """The LoraConfig a TrainConfig asks for; the new task-head modules train in full. Names in
    --targets that are `model`'s parameters rather than modules (fused MoE experts, such as
    mlp.experts.gate_up_proj) become target_parameters."""
    modules, parameters = config.targets, None
    if model is not None and isinstance(config.targets, list):
        modules, parameters = split_targets(model, config.targets)
    return lora.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=modules or None,
        target_parameters=parameters or None,
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=True if config.init == "kaiming" else config.init,
        modules_to_save=list(new_modules) or None,
        base_model_name_or_path=portable_name(config.model),  # lorakit_task.json keeps config.model
    )


def build(model: nn.Module, name: str, settings: dict[str, Any], head_modules: Sequence[str] = ()) -> nn.Module:
    """Apply non-LoRA method `name` with `settings` to `model`: everything is frozen but what
    the method trains and the head modules."""
    if name not in _BUILDERS:
        raise (
            unknown_method(name)
            if name not in METHODS
            else MethodError(f"{name} is not built here: use lorakit.inject")
        )
    model.requires_grad_(False)
    for head in head_modules:
        try:
            model.get_submodule(head).requires_grad_(True)
        except AttributeError:
            raise MethodError(f"this {type(model).__name__} has no task-head module {head!r}") from None
    root = _BUILDERS[name](model, **settings)
    inner = "model." if root is not model else ""
    params = [n for n, p in root.named_parameters() if p.requires_grad]
    if not params:
        raise MethodError(f"{name} leaves nothing to train in this {type(model).__name__}")
    heads = [inner + h for h in head_modules]
    root.__dict__[SPEC_KEY] = MethodSpec(
        name,
        dict(settings),
        list(head_modules),
        params,
        [n for n in params if any(n.startswith(h + ".") for h in heads)],
    )
    return root


def method_parameter_count(model: nn.Module) -> dict[str, Any]:
    """Parameters of the applied method: `trainable` (all it trains), `head` (the new task
    head's share), `paper_count` (trainable without the head: the paper's convention) and
    `total` (every parameter of the model, each once). For LoRA the paper count is A and B
    (plus biases a `bias` setting trains), the head its modules_to_save copies."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    spec = method_spec(model)
    if spec is not None:
        name = spec.name
        trainable, head = sum(sizes[n] for n in spec.params), sum(sizes[n] for n in spec.head_params)
    else:
        name = "lora" if lora_configs(model) else "none"
        head = sum(p.numel() for _, w in saved_modules(model) for p in w.modules_to_save.parameters())
        biases = {b for config in lora_configs(model).values() for b in bias_names(model, config)}
        trainable = lora.count_parameters(model).adapter + sum(sizes[b] for b in biases) + head
    return {
        "method": name,
        "trainable": trainable,
        "head": head,
        "paper_count": trainable - head,
        "total": sum(sizes.values()),
        "note": PAPER_COUNT_NOTE,
    }
