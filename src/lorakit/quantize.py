"""Holding a frozen base's linear weights quantised (QLoRA): NF4 or int8, through bitsandbytes.

    lorakit.quantize_base(model, "nf4")      # every nn.Linear but the output head, in place
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16))

The layers become bitsandbytes' own `Linear4bit` (NF4, blocks of 64, double-quantised scales:
QLoRA's recipe) or `Linear8bitLt` (int8 rows, outliers kept apart above 6.0): exactly what
transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)` or `(load_in_8bit=True)` would load, so an adapter trained
here runs unchanged on a base a user loads that way (and in PEFT). Embeddings, norms, the
output head and the modules named in `keep` (new task heads, which train) stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .models import output_head

SCHEMES = ("nf4", "int8")


class QuantizeError(ValueError):
    """A quantisation scheme or model that cannot be used; the message says what to do."""


def quantize_base(model: nn.Module, scheme: str, *, compute_dtype: torch.dtype = torch.float32,
                  keep: Iterable[str] = ()) -> int:  # fmt: skip
    """Replace every plain `nn.Linear` of `model` (but the output head and `keep`, and what lies
    inside them) by its bitsandbytes quantised twin, in place, on the weight's device. Returns
    how many layers were quantised. compute_dtype: what NF4 layers dequantise to for matmuls."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantisation {scheme!r}; choose one of {', '.join(SCHEMES)}")
    bnb = _bitsandbytes()
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
        setattr(owner, child, _quantized(bnb, linear, scheme, compute_dtype))
    return len(names)


def _quantized(bnb, linear: nn.Linear, scheme: str, compute_dtype: torch.dtype) -> nn.Module:
    """The bitsandbytes layer holding `linear`'s weight quantised (built on the meta device, so
    no second float copy of the weight is allocated; quantised when moved to the weight's device)."""
    has_bias, device, weight = linear.bias is not None, linear.weight.device, linear.weight.data
    if scheme == "nf4":
        # Quantised from the compute dtype (as transformers does for a base loaded in it): the
        # block scales are then kept in it, and every forward dequantises straight to it.
        weight = weight.to(compute_dtype)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
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
