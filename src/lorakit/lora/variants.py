"""The extension point of a LoRA layer: how one adapter's update enters it.

Every adapter on a layer has a variant. Plain LoRA (`LoraVariant` itself) adds
scaling·B·A·x to the base output and merges ΔW = scaling·B·A. A variant that changes the
update (DoRA: a magnitude per output row) overrides the three hooks below, so the layer's
forward, merge and saved state go through it without a branch per variant in every layer
type. A quantised base weight needs none of this: its `base_layer` computes its own output,
and the layer's `dense_weight` hook is where merging reads it.

    variant.create(layer, name)              extra parameters, after A and B exist
    variant.forward(layer, name, x, out)     out + this adapter's term, x: [..., in]
    variant.delta_weight(layer, name)        ΔW in fp32, the base weight's layout
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .layers import LoraLayer


class LoraVariant:
    """Plain LoRA (Hu et al. 2021): the layer type's own low-rank term and ΔW."""

    name = "lora"
    gathered = True  # may join a mixed batch's gathered matmul (a variant with its own
    # per-row math sets False and runs per adapter there)

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """Make the variant's extra parameters (plain LoRA has none)."""

    def forward(self, layer: LoraLayer, adapter: str, x: Tensor, out: Tensor) -> Tensor:
        return layer.lora_term(x, out, adapter)

    def delta_weight(self, layer: LoraLayer, adapter: str) -> Tensor:
        return layer.lora_delta(adapter)


PLAIN = LoraVariant()
