"""Holding a frozen base's linear weights quantised (QLoRA): NF4 or int8, through bitsandbytes.

    lorakit.quantize_base(model, "nf4")      # every nn.Linear but the output head, in place
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16))

The layers become bitsandbytes' own `Linear4bit` (NF4, blocks of 64, double-quantised scales:
QLoRA's recipe) or `Linear8bitLt` (int8 rows, outliers kept apart above 6.0): exactly what
transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)` or `(load_in_8bit=True)` would load, so an adapter trained
here runs unchanged on a base a user loads that way (and in PEFT). Embeddings, norms, the
output head and the modules named in `keep` (new task heads, which train) stay as they are.

On CPU the NF4 layers are `NF4Linear`, bitsandbytes' `Linear4bit` with one change to its
forward (see there): same weights, same state dict, same outputs, and no lossy repacking or
silent loss of input gradients after an eval pass.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import CheckpointReader, output_head

SCHEMES = ("nf4", "int8")


class QuantizeError(ValueError):
    """A quantisation scheme or model that cannot be used; the message says what to do."""


def quantize_base(model: nn.Module, scheme: str, *, compute_dtype: torch.dtype = torch.float32,
                  keep: Iterable[str] = (), reader: CheckpointReader | None = None) -> int:  # fmt: skip
    """Replace every plain `nn.Linear` of `model` (but the output head and `keep`, and what lies
    inside them) by its bitsandbytes quantised twin, in place, on the weight's device. Returns
    how many layers were quantised. compute_dtype: what NF4 layers dequantise to for matmuls.
    reader: the checkpoint the model was loaded from (lazily, in its stored dtype); each weight
    is then read from the file rather than through the module, so it never takes memory as a
    float tensor beyond its own layer (models.CheckpointReader)."""
    bnb = check_scheme(scheme)
    kept = tuple(keep)
    head = output_head(model)
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and module is not head
             and not any(name == k or name.startswith(k + ".") for k in kept)]  # fmt: skip
    if not names:
        raise QuantizeError(f"this {type(model).__name__} has no linear layer to quantise (outside its output "
                            "head and the modules kept in full); train it without --quantize")  # fmt: skip
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, child)
        weight = _stored_weight(reader, name, linear) if reader else None
        setattr(owner, child, _quantized(bnb, linear, scheme, compute_dtype, weight))
    return len(names)


def check_scheme(scheme: str):
    """Raise QuantizeError, before anything loads, for an unknown scheme or a missing backend;
    return the backend module."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantisation {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return _bitsandbytes()


def dequantize_base(model: nn.Module, dtype: torch.dtype) -> int:
    """The inverse of `quantize_base`, in place: every bitsandbytes NF4/int8 layer becomes a
    plain `nn.Linear` in `dtype` holding its dequantised weight, the very values the quantised
    forward computed with (so an adapter trained on it merges into what it was trained
    against). Returns how many layers changed."""
    layers = [(name, m) for name, m in model.named_modules()  # bitsandbytes' layers are nn.Linear subclasses
              if isinstance(m, nn.Linear) and not m.weight.is_floating_point()]  # fmt: skip
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        dense.weight = nn.Parameter(dequantized_weight(layer).to(dtype), requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    return len(layers)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight as its forward sees it, [out, in] fp32: NF4 codes times
    their (double-quantised) block scales, or int8 rows times their scale / 127."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse as unpack

    weight = layer.weight
    if hasattr(weight, "quant_state"):
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)
        return dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * weight.SCB.float()[:, None] / 127


def _stored_weight(reader: CheckpointReader, name: str, linear: nn.Linear) -> torch.Tensor | None:
    """`linear`'s weight as the checkpoint stores it, if the file holds it under the module's
    name unchanged (same shape, same first row): transformers renames or converts some
    checkpoints' tensors while loading, and those are read through the module instead."""
    stored = reader.get(f"{name}.weight")
    if stored is None or stored.shape != linear.weight.shape:
        return None
    return stored if torch.equal(stored[0].to(linear.weight.dtype), linear.weight[0]) else None


def _quantized(bnb, linear: nn.Linear, scheme: str, compute_dtype: torch.dtype,
               weight: torch.Tensor | None = None) -> nn.Module:  # fmt: skip
    """The bitsandbytes layer holding `linear`'s weight (or `weight`, the same values read from
    the checkpoint) quantised: built on the meta device, so no second float copy of the weight
    is allocated, and quantised when moved to the weight's device."""
    has_bias, device = linear.bias is not None, linear.weight.device
    weight = linear.weight.data if weight is None else weight.to(linear.weight.dtype)
    if scheme == "nf4":
        # Quantised from the compute dtype (as transformers does for a base loaded in it): the
        # block scales are then kept in it, and every forward dequantises straight to it.
        weight = weight.to(compute_dtype)
        layer = nf4_linear_class()(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=64, compress_statistics=True,
                                         quant_type="nf4", module=layer)  # fmt: skip
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")  # fmt: skip
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizeError("--quantize needs bitsandbytes, which is not installed: pip install bitsandbytes "
                            "(or pip install 'lorakit[quant]')") from e  # fmt: skip
    return bitsandbytes


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
    bnb = _bitsandbytes()
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse as unpack

    class DequantizedMatmul(torch.autograd.Function):
        """y = x @ dequantise(W).T; the backward dequantises again instead of keeping W dense."""

        @staticmethod
        def forward(ctx, x, weight):  # x: [..., in], weight: packed NF4 of [out, in]
            ctx.weight = weight
            return F.linear(x, dequantize_4bit(weight, weight.quant_state).to(x.dtype))

        @staticmethod
        def backward(ctx, grad):  # grad: [..., out] -> [..., in]; the frozen weight gets none
            return grad @ dequantize_4bit(ctx.weight, ctx.weight.quant_state).to(grad.dtype), None

    class NF4Linear(bnb.nn.Linear4bit):
        __doc__ = nf4_linear_class.__doc__

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            state = self.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                if not (torch.is_grad_enabled() and (x.requires_grad or self.training)):
                    return super().forward(x)
                self.weight.data, self.weight.quant_state = unpack(self.weight.data, state)
            if x.device.type != "cpu":
                return super().forward(x)
            dtype = self.compute_dtype or x.dtype
            out = DequantizedMatmul.apply(x.to(dtype), self.weight)
            if self.bias is not None:
                out = out + self.bias.to(dtype)
            return out.to(x.dtype)

    return NF4Linear
