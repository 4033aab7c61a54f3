"""The LoRA paper's baselines as fine-tuning methods, on the same data path and trainer.

    lora          low-rank updates (lorakit.lora; the default; PEFT's adapter format)
    full          every parameter trains
    top2          FT-Top2: the last two transformer blocks
    bitfit        bias terms only
    adapter-h     Houlsby adapters after attention and MLP (bottleneck --adapter-size)
    adapter-l     Lin adapter after the MLP, with its own LayerNorm
    adapter-p     Pfeiffer adapter after the MLP (ReLU, no LayerNorm)
    adapter-drop  AdapterDrop: Houlsby adapters without those of the lowest blocks
    prefix-embed  trainable prefix token embeddings (--prefix-length positions)
    prefix-layer  trainable prefix keys/values in every attention layer

Every method also trains the freshly initialised task head. `apply_method(model, config,
new_modules)` sets a model up; `save_method` / `load_method` write and read only what the method
trains (method_config.json + method_model.safetensors; LoRA: PEFT's format);
`method_parameter_count` counts as the paper does (task head excluded).
"""

from .apply import METHODS, Method, MethodSpec, apply_method, build, lora_config, method_parameter_count, method_spec
from .errors import MethodError
from .io import (
    METHOD_CONFIG,
    MethodLoadError,
    is_method_dir,
    load_method,
    method_state_dict,
    read_method_config,
    save_method,
)

__all__ = [
    "METHODS",
    "METHOD_CONFIG",
    "Method",
    "MethodError",
    "MethodLoadError",
    "MethodSpec",
    "apply_method",
    "build",
    "is_method_dir",
    "lora_config",
    "load_method",
    "method_parameter_count",
    "method_spec",
    "method_state_dict",
    "read_method_config",
    "save_method",
]
