"""NF4 and int8 layers through bitsandbytes: exactly what transformers' `BitsAndBytesConfig`
loads (NF4 in blocks of 64 with double-quantised scales, QLoRA's recipe; int8 rows with
outliers kept apart above 6.0), so an adapter trained here runs on a base a user loads that way.

On CPU the NF4 layers are `NF4Linear`, bitsandbytes' `Linear4bit` with one change to its
forward (see `nf4_linear_class`): same weights, same state dict, same outputs, and no lossy
repacking or silent loss of input gradients after an eval pass.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn as nn

from .errors import QuantizeError
from .matmul import dequantized_linear, scratch


def bitsandbytes():
    """The bitsandbytes module, or a QuantizeError naming the package to install."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizeError("--quantize nf4|int8 needs bitsandbytes, which is not installed: pip install "
                            "bitsandbytes (or pip install 'lorakit[quant]')") from e  # fmt: skip
    return bitsandbytes


def bnb_layer(linear: nn.Linear, scheme: str, compute_dtype: torch.dtype, weight: torch.Tensor) -> nn.Module:
    """The bitsandbytes layer holding `weight` ([out, in], `linear`'s values) quantised: built on
    the meta device, so no second float copy is allocated, and quantised when moved to the
    weight's device."""
    bnb, has_bias = bitsandbytes(), linear.bias is not None
    if scheme == "nf4":
        # Quantised from the compute dtype (as transformers does for a base loaded in it): the
        # block scales are then kept in it, and every forward dequantises straight to it.
        layer = nf4_linear_class()(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, blocksize=64,
                                         compress_statistics=True, quant_type="nf4", module=layer)  # fmt: skip
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")  # fmt: skip
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(linear.weight.device)


def bnb_dequantized(layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight as its forward sees it, [out, in] fp32: NF4 codes times
    their (double-quantised) block scales, or int8 rows times their scale / 127."""
    from bitsandbytes.functional import dequantize_4bit

    weight = layer.weight
    if hasattr(weight, "quant_state"):
        _unpack(weight)
        return dequantize_4bit(weight.data, weight.quant_state).float()
    # a forward moves the int8 row scales from the weight to the layer's matmul state
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return weight.data.float() * scales.float()[:, None] / 127


def upgrade_nf4_layers(model: nn.Module) -> int:
    """Turn the plain bitsandbytes `Linear4bit` layers of a model a user loaded (transformers'
    BitsAndBytesConfig) into `NF4Linear`, in place: same weights and state dict, the CPU forward
    of `nf4_linear_class`. Returns how many changed. bitsandbytes is not imported unless the
    model already holds its layers."""
    plain = [m for m in model.modules() if type(m).__name__ == "Linear4bit"
             and type(m).__module__.startswith("bitsandbytes")]  # fmt: skip
    for module in plain:
        module.__class__ = nf4_linear_class()
    return len(plain)


def _unpack(weight) -> None:
    """Undo bitsandbytes' CPU inference repacking of an NF4 weight, in place, if it was done."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse as unpack

    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)


@functools.cache
def nf4_linear_class() -> type:
    """`NF4Linear`: bitsandbytes' `Linear4bit` whose CPU forward dequantises the weight with
    bitsandbytes' native (multi-threaded) kernel and runs one torch matmul, the backward the
    same. Why: on a no-grad eval pass on CPU, `Linear4bit` repacks its weight in place for an
    inference kernel, lossily (block scales rounded to bf16, the double quantisation dropped),
    and that kernel has no backward: training after an eval pass silently loses the gradient
    through the layer. Speed is bitsandbytes' own or a little better (forward 6.2 against 6.8
    ms for 256 x 2048 -> 5632 in bf16, forward + input gradient equal; benchmarks/quant.py
    --layer). A weight bitsandbytes already repacked is used as it is without a gradient,
    unpacked when one is needed."""
    bnb = bitsandbytes()
    from bitsandbytes.functional import dequantize_4bit

    class NF4Linear(bnb.nn.Linear4bit):
        __doc__ = nf4_linear_class.__doc__

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if getattr(self.weight.quant_state, "packing_format_for_cpu", False):
                if not (torch.is_grad_enabled() and (x.requires_grad or self.training)):
                    return super().forward(x)
                _unpack(self.weight)
            if x.device.type != "cpu":
                return super().forward(x)
            return dequantized_linear(x, self)

        def dense(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
            """The weight [out, in] in `dtype`, written into `out` when given."""
            state = self.weight.quant_state
            if out is not None and _dequantize_nf4_into(self.weight, state, out):
                return out
            weight = dequantize_4bit(self.weight, state).to(dtype)
            return weight if out is None else out.copy_(weight)

    return NF4Linear


def _dequantize_nf4_into(weight: torch.Tensor, state, out: torch.Tensor) -> bool:
    """Dequantise an NF4 weight into `out` ([out, in], the state's dtype, CPU) with
    bitsandbytes' own native CPU kernel, the one `dequantize_4bit` runs; False (nothing
    written) where that kernel does not apply. Why not `dequantize_4bit(..., out=out)`:
    bitsandbytes 0.50 registers no CPU kernel for that variant, and a fresh tensor per call is
    what fragments the heap (matmul.scratch)."""
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    kernel = getattr(lib, f"cdequantize_blockwise_cpu_nf4_{_KERNEL_DTYPE.get(out.dtype)}", None)
    rows, cols = out.shape
    # the kernel's own preconditions; bitsandbytes falls back to torch ops for odd rows and, with
    # AVX-512, for blocks of 2048 and up
    if (
        kernel is None
        or out.device.type != "cpu"
        or state.quant_type != "nf4"
        or out.dtype != state.dtype
        or tuple(state.shape) != (rows, cols)
        or cols % 2
        or state.blocksize >= 2048
        or not out.is_contiguous()
    ):
        return False
    # double quantisation: the block scales are themselves 8-bit blocks
    absmax = _nested_scales(state) if state.nested else state.absmax.float()
    codes = weight.data.view(torch.uint8).reshape(rows, cols // 2)
    kernel(get_ptr(codes), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(state.blocksize),
           ctypes.c_longlong(rows), ctypes.c_longlong(cols))  # fmt: skip
    return True


def _nested_scales(state) -> torch.Tensor:
    """A double-quantised NF4 weight's block scales [blocks] fp32, as `dequantize_4bit` computes
    them (bitsandbytes' native 8-bit blockwise kernel, plus the offset), in a scratch buffer."""
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import dequantize_blockwise, get_ptr

    codes, inner = state.absmax.contiguous(), state.state2
    kernel = getattr(lib, "cdequantize_blockwise_cpu_fp32", None)
    if kernel is None or inner.absmax.dtype != torch.float32:
        return (dequantize_blockwise(state.absmax, inner) + state.offset).float()
    out = scratch(tuple(codes.shape), torch.float32, codes.device, "block scales")
    kernel(get_ptr(inner.code), get_ptr(codes), get_ptr(inner.absmax), get_ptr(out),
           ctypes.c_longlong(inner.blocksize), ctypes.c_longlong(codes.numel()))  # fmt: skip
    return out.add_(state.offset)


_KERNEL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
