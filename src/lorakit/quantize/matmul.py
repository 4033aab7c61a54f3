"""The one matmul every quantised frozen layer runs: dequantise, then a plain torch matmul.

A quantised layer here is any module with `in_features`, `out_features`, `bias`,
`compute_dtype` and `dense(dtype, out=None)`, which writes its weight [out, in] dequantised to
`dtype` into `out` (when given) and returns it.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

_buffers = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, purpose: str = "weight") -> torch.Tensor:
    """This thread's reusable buffer for `purpose` (one dequantised weight at a time, or its
    block scales), shared by every layer and grown to the largest. Why: a training step
    dequantises each weight twice, and fresh tensors each time leave glibc's heap holding the
    freed ones between the activations (a TinyLlama-1.1B shape peaked 2.5 GB instead of 2.0 GB).
    Per thread, so concurrent forwards never share one; the buffer lives as long as its thread
    (lorakit's trainer and server run the model in one thread: one weight's worth of memory)."""
    cache = _buffers.__dict__.setdefault("by_purpose", {})
    numel, key = math.prod(shape), (purpose, dtype, device)
    if key not in cache or cache[key].numel() < numel:
        cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return cache[key][:numel].view(shape)


class DequantizedMatmul(torch.autograd.Function):
    """y = x @ W.T for a frozen weight held quantised. The backward (the gradient for x only: W
    is frozen) dequantises W again rather than keeping it dense from the forward, which would
    cost the memory quantising saved. Either way W lives only in a scratch buffer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, _dense(layer, x))  # x: [..., in] -> [..., out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: [..., out] -> [..., in]
        return grad @ _dense(ctx.layer, grad), None


def _dense(layer: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """`layer`'s weight [out, in] dequantised into a scratch buffer of `like`'s dtype and device."""
    shape = (layer.out_features, layer.in_features)
    return layer.dense(like.dtype, out=scratch(shape, like.dtype, like.device))


def dequantized_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A quantised layer's forward: computed in its `compute_dtype` (else x's), returned in x's."""
    dtype = layer.compute_dtype or x.dtype
    out = DequantizedMatmul.apply(x.to(dtype), layer)
    if layer.bias is not None:
        out = out + layer.bias.to(dtype)
    return out.to(x.dtype)
