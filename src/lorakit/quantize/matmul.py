"""The one matmul every quantised frozen layer runs: dequantise, then a plain torch matmul."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class DequantizedMatmul(torch.autograd.Function):
    """y = x @ W.T for a frozen weight held quantised. `dense(dtype)` dequantises it to
    [out, in]; the backward (the gradient for x only: W is frozen) dequantises it again
    rather than keeping W dense from the forward, which would cost the memory quantising saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dense: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
        ctx.dense = dense
        return F.linear(x, dense(x.dtype))  # x: [..., in] -> [..., out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: [..., out] -> [..., in]
        return grad @ ctx.dense(grad.dtype), None


def dequantized_linear(x: torch.Tensor, dense: Callable[[torch.dtype], torch.Tensor],
                       bias: torch.Tensor | None, compute_dtype: torch.dtype | None) -> torch.Tensor:  # fmt: skip
    """A quantised layer's forward: computed in `compute_dtype` (else x's), returned in x's."""
    dtype = compute_dtype or x.dtype
    out = DequantizedMatmul.apply(x.to(dtype), dense)
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(x.dtype)
