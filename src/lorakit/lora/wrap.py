"""Which layer types LoRA wraps, and the wrapper each gets."""

from __future__ import annotations

import torch.nn as nn

from .conv import LoraConv2d
from .embedding import LoraEmbedding
from .layers import LoraLayer, LoraLinear


def conv1d_type() -> type | None:
    """Hugging Face's GPT-2 `Conv1D` (a linear layer whose weight is stored [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the core
        return None
    return Conv1D


SUPPORTED_TYPE_NAMES = ("Linear", "Conv1D (GPT-2)", "Embedding", "Conv2d")


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA wrapper for a supported layer; a clear error for anything else."""
    if isinstance(module, LoraLayer):
        return module
    if is_linear(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    raise TypeError(
        f"{type(module).__name__} is not a layer type LoRA can wrap; supported: {', '.join(SUPPORTED_TYPE_NAMES)}"
    )


def is_linear(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_supported(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv2d))
