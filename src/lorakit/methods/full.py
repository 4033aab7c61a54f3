"""Methods that choose which existing parameters train: full fine-tuning, FT-Top2, BitFit.

Each takes a frozen model and sets `requires_grad` on what it trains (the new task head is
added by the caller); nothing is wrapped or added, so the model's outputs start unchanged.
"""
from __future__ import annotations

import torch.nn as nn

from .errors import MethodError

# Names of the repeated-block lists: BERT `encoder.layer`, LLaMA `layers`, GPT-2 `h`, T5 `block`.
BLOCK_LISTS = ("layer", "layers", "h", "block", "blocks")


def block_stacks(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of transformer blocks, outermost only (T5 has two: encoder and
    decoder; the `layer` list inside each T5 block is not a stack)."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 1 and name.rsplit(".", 1)[-1] in BLOCK_LISTS
                and not any(name.startswith(outer + ".") for outer, _ in stacks)):
            stacks.append((name, module))
    if not stacks:
        raise MethodError(f"cannot find the transformer blocks of this {type(model).__name__}: no module list "
                          f"named {', '.join(BLOCK_LISTS)}")
    return [stack for _, stack in stacks]


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
        raise MethodError(f"bitfit trains bias terms, and this {type(model).__name__} has none "
                          "(LLaMA-style models have no biases); choose another --method")
    for p in biases:
        p.requires_grad_(True)
    return model
