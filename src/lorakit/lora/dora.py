"""DoRA (Liu et al. 2024): weight-decomposed LoRA, as a variant of a linear layer's adapter.

The adapted weight is split into a direction and a trained magnitude per output row:

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row          m: [out], initialised to ‖W0‖_row

so with g = m / ‖W0 + s·B·A‖_row (the norm detached from the graph, as the paper's §4.3 and
PEFT do) the layer computes

    y = base(x) + (g - 1)·(x·W0ᵀ) + g·s·x·Aᵀ·Bᵀ

The norm is where DoRA's cost goes. PEFT forms W0 + s·B·A ([out, in]) every step; here it is
expanded instead, so no dense matrix is built and a quantised W0 is never dequantised for it:

    ‖W0 + sBA‖²_row = ‖W0‖²_row + 2s·Σ_k B ⊙ (W0·Aᵀ) + s²·Σ_k B ⊙ (B·(A·Aᵀ))

‖W0‖²_row is computed once per base weight; W0·Aᵀ ([out, r]) is one thin matmul.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from . import functional as LF
from .layers import LoraLayer, LoraLinear
from .variants import LoraVariant

MAGNITUDE = "lora_magnitude_vector"  # PEFT's parameter (and saved key) name


class DoraVariant(LoraVariant):
    name = "dora"
    gathered = False  # g is per adapter: a mixed batch runs each adapter on its own rows
    uses_base_output = True

    def create(self, layer: LoraLayer, adapter: str) -> None:
        if not isinstance(layer, LoraLinear):
            raise ValueError(
                f"DoRA (use_dora) is implemented for linear layers; this target is of type "
                f"{type(layer.base_layer).__name__}. Leave it out of target_modules, or train it without use_dora"
            )
        if MAGNITUDE not in layer._modules:
            layer.add_module(MAGNITUDE, nn.ParameterDict())
        with torch.no_grad():
            m = weight_norm(layer, adapter)  # g = 1: the layer starts as W0 + s·B·A
        layer.lora_magnitude_vector[adapter] = nn.Parameter(m.to(layer.adapter_dtype))

    def parameters(self, layer: LoraLayer, adapter: str) -> dict[str, nn.Parameter]:
        return {MAGNITUDE: layer.lora_magnitude_vector[adapter]}

    def delete(self, layer: LoraLayer, adapter: str) -> None:
        if adapter in layer._modules.get(MAGNITUDE, {}):  # (absent when `create` refused the layer)
            layer.lora_magnitude_vector.pop(adapter)

    def forward(self, layer: LoraLayer, adapter: str, x: Tensor, out: Tensor, base: Tensor) -> Tensor:
        """x: [..., in], out and base: [..., out]."""
        xd = layer.dropout(x, layer.dropout_p[adapter])
        if xd is not x:  # dropout is on: the base term is taken on the dropped input too (PEFT's rule)
            base = layer.base_layer(xd)
        bias = getattr(layer.base_layer, "bias", None)
        bias = None if bias is None else bias.to(base.dtype)
        with torch.no_grad():
            norm = weight_norm(layer, adapter)  # [out], detached
        g = (layer.lora_magnitude_vector[adapter] / norm).to(x.dtype)
        A, B = layer.A_matrix(adapter).to(x.dtype), layer.B_matrix(adapter).to(x.dtype)
        h = xd @ A.t()  # [..., r]
        s = layer.scaling[adapter]
        if out is base:  # one adapter, no dropout (the usual case): y = g·(x·W0ᵀ + s·h·Bᵀ) + bias,
            # the up-projection accumulated into the base output by one GEMM, then one scaling pass
            core = base if bias is None else base - bias
            y = LF.lora_forward_h(h, core, B, s) * g
            return y if bias is None else y + bias
        base = base if bias is None else base - bias  # x·W0ᵀ
        return out + (g - 1) * base + (g * s) * (h @ B.t())

    def delta_weight(self, layer: LoraLayer, adapter: str) -> Tensor:
        """W' - W0 = (g - 1)·W0 + g·s·B·A in fp32, the norm formed directly (merging is once)."""
        W0 = layer.base_weight().float()  # [out, in]
        lora = LF.delta_weight(layer.A_matrix(adapter), layer.B_matrix(adapter), layer.scaling[adapter])
        g = (layer.lora_magnitude_vector[adapter].float() / torch.linalg.norm(W0 + lora, dim=1))[:, None]
        delta = (g - 1) * W0 + g * lora
        return delta.t() if layer.fan_in_fan_out else delta


DORA = DoraVariant()


def weight_norm(layer: LoraLinear, adapter: str) -> Tensor:
    """‖W0 + s·B·A‖ per output row, [out] fp32, through the expansion above."""
    A, B, s = layer.A_matrix(adapter).float(), layer.B_matrix(adapter).float(), layer.scaling[adapter]
    cross = (B * base_times(layer, A).float()).sum(1)  # Σ_k B ⊙ (W0·Aᵀ): [out]
    square = (B * (B @ (A @ A.t()))).sum(1)  # ‖B·A‖²_row: [out]
    return (row_square_norms(layer) + 2 * s * cross + s * s * square).clamp_min(0).sqrt()


def base_times(layer: LoraLinear, A: Tensor) -> Tensor:
    """W0·Aᵀ: [out, r]. A quantised base computes it with its own kernel (no dense copy)."""
    if layer.quantized:
        product = layer.base_layer(A.to(torch.float32))  # [r, out], bias added
        bias = getattr(layer.base_layer, "bias", None)
        return (product - bias if bias is not None else product).t()
    W0 = layer.base_weight()
    return W0 @ A.to(W0.dtype).t()


def row_square_norms(layer: LoraLinear) -> Tensor:
    """‖W0‖² per output row, [out] fp32, kept while the base weight is unchanged."""
    weight = layer.weight
    key = (weight.data_ptr(), weight._version, layer.exact.original is not None)
    cached = layer.__dict__.get("_dora_row_norms")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, layer.base_weight().float().pow(2).sum(1))
        layer.__dict__["_dora_row_norms"] = cached
    return cached[1]
