"""Methods that choose which existing parameters train: full fine-tuning, FT-Top2, BitFit.

Each takes a frozen model and sets `requires_grad` on what it trains (the new task head is
added by the caller); nothing is wrapped or added, so the model's outputs start unchanged.
"""

from __future__ import annotations

import torch.nn as nn

from ..lora import architectures
from .errors import MethodError


def block_stacks(model: nn.Module) -> list[nn.ModuleList]:
    stacks = architectures.block_stacks(model)
    if not stacks:
        raise MethodError(
            f"cannot find the transformer blocks of this {type(model).__name__}: no module list "
            f"named {', '.join(architectures.BLOCK_LISTS)}"
        )
    return stacks


def train_all(model: nn.Module) -> nn.Module:
    """full: every parameter trains."""
    model.requires_grad_(True)
    return model


def train_top(model: nn.Module, blocks: int = 2) -> nn.Module:
    """top2 (the paper's FT-Top2): the last `blocks` blocks of each stack train."""
    for stack in block_stacks(model):
        for block in list(stack)[-blocks:]:
            block.requires_grad_(True)
    return model


def train_biases(model: nn.Module) -> nn.Module:
    """bitfit: every parameter named `bias` trains (projections, MLP and LayerNorm biases)."""
    biases = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if not biases:
        raise MethodError(
            f"bitfit trains bias terms, and this {type(model).__name__} has none "
            "(LLaMA-style models have no biases); choose another --method"
        )
    for p in biases:
        p.requires_grad_(True)
    return model
