"""LoRA on a 2-D convolution: A a convolution like the base's, B a 1x1 convolution."""

from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import LoraLayer
from .mixed import per_adapter_rows


class LoraConv2d(LoraLayer):
    """nn.Conv2d: A is a conv with the base's kernel/stride/padding ([r, in, kh, kw]),
    B a 1x1 conv ([out, r, 1, 1]), as in PEFT."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError("LoRA on grouped Conv2d (groups > 1) is not supported; target another layer")
        self.fan_out = base_layer.out_channels
        self.fan_in = base_layer.in_channels * math.prod(base_layer.kernel_size)

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        c = self.base_layer
        return (r, c.in_channels, *c.kernel_size), (c.out_channels, r, 1, 1)

    def add_adapter(self, name: str, r: int, alpha: float, **kwargs) -> None:
        if kwargs.get("slices") is not None:
            raise ValueError("enable_lora (per-slice LoRA) applies to fused linear projections, not Conv2d")
        super().add_adapter(name, r, alpha, **kwargs)

    def lora_term(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        c = self.base_layer
        A, B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        h = F.conv2d(self.dropout(x, self.dropout_p[name]), A, None, c.stride, c.padding, c.dilation)
        return out + F.conv2d(h, B * self.scaling[name])

    def _mixed_forward(self, x: Tensor, out: Tensor) -> Tensor:
        # Convolutions have no gathered-bmm form; run each adapter on its rows only.
        return per_adapter_rows(self, x, out, lambda name, xs, outs: self._adapter_forward(xs, outs, name))
