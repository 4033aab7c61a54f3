"""The LoRA core: config, layer math, injection, merge, mixed batches, adapter I/O.

functional.py       the math as pure functions (ΔW, the forward term, stacking, combining)
layers.py           the base wrapper (keeps `base_layer`) and Linear/Conv1D; embedding.py, conv.py
wrap.py             which layer types LoRA wraps, and the wrapper each gets
variants.py         the extension point: how an adapter's update enters its layer
dora.py             DoRA, a variant: a trained magnitude per output row
principal.py        PiSSA / OLoRA: A and B from W, which keeps the residual; conversion to LoRA
parameters.py       LoRA on a parameter (fused MoE experts, PEFT's target_parameters)
tokens.py           trainable embedding rows of new tokens (PEFT's trainable_token_indices)
exact.py            exact merge/unmerge of one weight
mixed.py            mixed-adapter batches, layer side (routing, stacks, gathered matmul)
modules_to_save.py  whole modules trained per adapter (a new task head)
architectures.py    default targets, block lists, adapter sites per architecture
config.py           LoraConfig with PEFT's field names
targets.py          which modules a config selects (PEFT's matching rules), dry_run
inject.py           wrapping, freezing; the model's adapter registry
adapters.py         many adapters on one base: activate, disable, delete, mix, combine, count
merge.py            merge, unmerge, merge_and_unload for a whole model
io.py, combine.py   PEFT's on-disk format; combining saved adapters
"""

from .adapters import (
    ParameterCount,
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    mixed_batch,
    set_adapter,
)
from .architectures import DEFAULT_TARGETS
from .combine import combine_adapters
from .config import ConfigError, LoraConfig
from .conv import LoraConv2d
from .embedding import LoraEmbedding
from .gguf_adapter import GGUFAdapterError, export_gguf, is_gguf_adapter
from .inject import inject, lora_configs, lora_layers, set_trainable
from .io import AdapterLoadError, adapter_state_dict, load_adapter, read_adapter_weights, save_adapter
from .layers import LoraLayer, LoraLinear
from .merge import MergeError, merge, merge_and_unload, unload, unmerge
from .modules_to_save import ModulesToSave
from .targets import Target, TargetError, dry_run, find_targets
from .tokens import TrainableTokens, new_token_rows
from .variants import LoraVariant

__all__ = [
    "GGUFAdapterError",
    "export_gguf",
    "is_gguf_adapter",
    "DEFAULT_TARGETS",
    "AdapterLoadError",
    "ConfigError",
    "LoraConfig",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraVariant",
    "MergeError",
    "ModulesToSave",
    "ParameterCount",
    "Target",
    "TargetError",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "add_weighted_adapter",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "dry_run",
    "find_targets",
    "inject",
    "lora_configs",
    "lora_layers",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "read_adapter_weights",
    "save_adapter",
    "set_adapter",
    "set_trainable",
    "TrainableTokens",
    "new_token_rows",
    "unload",
    "unmerge",
]
