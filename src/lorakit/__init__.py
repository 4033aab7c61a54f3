"""lorakit: LoRA (Low-Rank Adaptation) for PyTorch and Hugging Face models.

import lorakit
model = lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16))   # wraps Wq, Wv
...train...
lorakit.save_adapter(model, "out/adapter")                              # PEFT's format
"""

from .lora import (
    AdapterLoadError,
    ConfigError,
    LoraConfig,
    MergeError,
    ParameterCount,
    Target,
    TargetError,
    active_adapters,
    adapter_names,
    adapter_state_dict,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    find_targets,
    inject,
    load_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    mixed_batch,
    save_adapter,
    set_adapter,
    set_trainable,
    unload,
    unmerge,
)
from .lora.targets import dry_run
from .quantize import quantize_base

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "LoraConfig",
    "MergeError",
    "ParameterCount",
    "Target",
    "TargetError",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "add_weighted_adapter",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "dry_run",
    "find_targets",
    "inject",
    "load_adapter",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "quantize_base",
    "save_adapter",
    "set_adapter",
    "set_trainable",
    "unload",
    "unmerge",
]
