"""The LoRA core: config, layer math, injection, merge, mixed batches, adapter I/O."""
from .adapters import (ParameterCount, active_adapters, add_weighted_adapter, adapter_names,
                       count_parameters, delete_adapter, disable_adapters, mixed_batch, set_adapter)
from .config import ConfigError, LoraConfig
from .inject import (DEFAULT_TARGETS, Target, TargetError, find_targets, inject, lora_configs,
                     lora_layers, set_trainable)
from .io import AdapterLoadError, adapter_state_dict, load_adapter, read_adapter_weights, save_adapter
from .layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .modules_to_save import ModulesToSave
from .variants import LoraVariant
from .merge import MergeError, merge, merge_and_unload, unload, unmerge
from .combine import combine_adapters
