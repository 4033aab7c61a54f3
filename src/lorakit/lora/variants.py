"""The extension point of a LoRA layer: how one adapter's update enters it.

Every adapter on a layer has a variant. Plain LoRA (`LoraVariant` itself) adds
scaling·B·A·x to the base output and merges ΔW = scaling·B·A. A variant that changes the
update (DoRA: a magnitude per output row) overrides the three hooks below, so the layer's
forward, merge and saved state go through it without a branch per variant in every layer
type. A quantised base weight needs none of this: its `base_layer` computes its own output,
and the layer's `dense_weight` hook is where merging reads it.

    variant.create(layer, name)              extra parameters, after A and B exist
    variant.parameters(layer, name)          those, by their PEFT key suffix (saved, trained)
    variant.forward(layer, name, x, out, base)
                                             out + this adapter's term, x: [..., in]; base is
                                             the base layer's own output (out may hold other
                                             adapters' terms already)
    variant.delta_weight(layer, name)        ΔW in fp32, the base weight's layout
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:
    from .layers import LoraLayer


class LoraVariant:
    """Plain LoRA (Hu et al. 2021): the layer type's own low-rank term and ΔW."""

    name = "lora"
    gathered = True  # may join a mixed batch's gathered matmul (a variant with its own
    # per-row math sets False and runs per adapter there)

    uses_base_output = False  # reads `base` in forward (the layer then keeps it apart)

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """Make the variant's extra parameters (plain LoRA has none)."""

    def parameters(self, layer: LoraLayer, adapter: str) -> dict[str, nn.Parameter]:
        """The extra parameters, keyed by the suffix PEFT saves them under."""
        return {}

    def delete(self, layer: LoraLayer, adapter: str) -> None:
        """Drop the extra parameters of a deleted adapter."""

    def forward(self, layer: LoraLayer, adapter: str, x: Tensor, out: Tensor, base: Tensor) -> Tensor:
        return layer.lora_term(x, out, adapter)

    def delta_weight(self, layer: LoraLayer, adapter: str) -> Tensor:
        return layer.lora_delta(adapter)


PLAIN = LoraVariant()
