"""Holding a frozen base's linear weights quantised (QLoRA): NF4 or int8 through bitsandbytes,
or the blocks of the model's own GGUF file.

    lorakit.quantize_base(model, "nf4")      # every nn.Linear but the output head, in place
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16))

- nf4 / int8 (bnb.py): bitsandbytes' own layers, exactly what transformers'
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`
  or `(load_in_8bit=True)` loads, so an adapter trained here runs unchanged on a base a user
  loads that way (and in PEFT).
- gguf (gguf_blocks.py): each weight the GGUF file holds quantised stays those blocks.
Embeddings, norms, the output head and the modules named in `keep` (new task heads, which
train) stay as they are. Every quantised layer computes through matmul.py: dequantise, then
one torch matmul, forward and backward.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from ..models import CheckpointReader, output_head
from .bnb import bitsandbytes, bnb_dequantized, bnb_layer, nf4_linear_class, upgrade_nf4_layers
from .errors import QuantizeError
from .gguf_blocks import GGUFLinear, dequantize_blocks, gguf_layers

SCHEMES = ("nf4", "int8", "gguf")

__all__ = ["SCHEMES", "GGUFLinear", "QuantizeError", "check_scheme", "dequantize_base", "dequantize_blocks",
           "dequantized_weight", "nf4_linear_class", "quantize_base", "upgrade_nf4_layers"]  # fmt: skip


def quantize_base(model: nn.Module, scheme: str, *, compute_dtype: torch.dtype = torch.float32,
                  keep: Iterable[str] = (), reader: CheckpointReader | None = None,
                  gguf_file: str | Path | None = None) -> int:  # fmt: skip
    """Replace every plain `nn.Linear` of `model` (but the output head and `keep`, and what lies
    inside them) by its quantised twin, in place, on the weight's device. Returns how many
    layers were quantised. compute_dtype: what the layers dequantise to for matmuls.
    reader (nf4/int8): the checkpoint the model was loaded from (lazily, in its stored dtype);
    each weight is then read from the file rather than through the module, so it never takes
    memory as a float tensor beyond its own layer (models.CheckpointReader).
    gguf_file (gguf): the GGUF file the model was loaded from, whose blocks the layers keep."""
    check_scheme(scheme)
    kept = tuple(keep)
    head = output_head(model)
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and module is not head
             and not any(name == k or name.startswith(k + ".") for k in kept)]  # fmt: skip
    if scheme == "gguf":
        if gguf_file is None:
            raise QuantizeError("--quantize gguf keeps a GGUF file's blocks, and this model was not loaded from one "
                                "(a .gguf path or the smollm2-135m alias); use --quantize nf4 or int8")  # fmt: skip
        skip = {name for name, module in model.named_modules() if type(module) is nn.Linear} - set(names)
        count = gguf_layers(model, gguf_file, compute_dtype, skip)
    else:
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            linear = getattr(owner, child)
            weight = _stored_weight(reader, name, linear) if reader else None
            weight = linear.weight.data if weight is None else weight.to(linear.weight.dtype)
            setattr(owner, child, bnb_layer(linear, scheme, compute_dtype, weight))
            del linear, weight
            _return_freed_heap()
        count = len(names)
    if not count:
        raise QuantizeError(f"this {type(model).__name__} has no linear layer to quantise (outside its output "
                            "head and the modules kept in full); train it without --quantize")  # fmt: skip
    return count


def _return_freed_heap() -> None:
    """Give the heap pages that quantising a layer freed back to the OS (glibc's malloc_trim):
    each float weight read and dropped leaves a hole between the small blocks kept, and the
    holes stay resident; trimmed per layer, a TinyLlama-1.1B shape quantises within 0.1 GB of
    its final size instead of 0.3-0.5 GB over it. Elsewhere (another libc) nothing happens."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (found once: 4 ms a lookup)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def check_scheme(scheme: str) -> None:
    """Raise QuantizeError, before anything loads, for an unknown scheme or a missing backend."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantisation {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "gguf":
        if importlib.util.find_spec("gguf") is None:
            raise QuantizeError("--quantize gguf needs the gguf package, which is not installed: pip install gguf")
    else:
        bitsandbytes()


def dequantize_base(model: nn.Module, dtype: torch.dtype) -> int:
    """The inverse of `quantize_base`, in place: every quantised linear layer becomes a plain
    `nn.Linear` in `dtype` holding its dequantised weight, the very values the quantised
    forward computed with (so an adapter trained on it merges into what it was trained
    against). Returns how many layers changed."""
    layers = [(name, m) for name, m in model.named_modules()  # the quantised layers are nn.Linear subclasses
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
    """A quantised layer's weight as its forward sees it, [out, in] fp32."""
    if isinstance(layer, GGUFLinear):
        return layer.dense(torch.float32)
    return bnb_dequantized(layer)


def _stored_weight(reader: CheckpointReader, name: str, linear: nn.Linear) -> torch.Tensor | None:
    """`linear`'s weight as the checkpoint stores it, if the file holds it under the module's
    name unchanged (same shape, same first row): transformers renames or converts some
    checkpoints' tensors while loading, and those are read through the module instead."""
    stored = reader.get(f"{name}.weight")
    if stored is None or stored.shape != linear.weight.shape:
        return None
    return stored if torch.equal(stored[0].to(linear.weight.dtype), linear.weight[0]) else None
