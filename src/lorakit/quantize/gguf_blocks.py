"""A frozen base held in its GGUF file's own quantised blocks (`--quantize gguf`): each linear
weight stays the file's Q4_0 / Q4_1 / Q8_0 (or K-quant, ...) blocks and is dequantised inside
every forward and backward, so an adapter trains against the very weights llama.cpp runs.

Q4_0, Q4_1 and Q8_0 dequantise in torch, bit for bit what the `gguf` package computes; other
block types go through the `gguf` package itself (numpy: correct, slower). Names and the rows
of the attention projections follow transformers' own GGUF loader (its name map and its
tensor processors), so a layer's dequantised weight is exactly what transformers loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import QuantizeError
from .matmul import dequantized_linear

BYTES_PER_BLOCK = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # each block: 32 values
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# Dequantising a whole weight at once allocates fp32 temporaries of its full size, fresh pages
# each call; in slices of ~4 MB the allocator reuses them: 2048 x 5632 Q4_1 to bf16 in 11-13
# ms instead of 54 (benchmarks/quant.py --layer).
CHUNK_BYTES = 1 << 22


def dequantize_blocks(blocks: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """GGUF blocks [rows, bytes per row] uint8 -> weights [rows, cols] fp32."""
    rows = blocks.shape[0]
    if qtype not in BYTES_PER_BLOCK:
        import gguf

        values = gguf.quants.dequantize(blocks.cpu().numpy(), gguf.GGMLQuantizationType[qtype])
        return torch.from_numpy(values).reshape(rows, cols).to(blocks.device)
    b = blocks.reshape(rows, -1, BYTES_PER_BLOCK[qtype])  # [rows, blocks, bytes of one block]
    d = b[..., :2].contiguous().view(torch.float16).float()  # [rows, blocks, 1]: the block's scale
    if qtype == "Q8_0":
        return (b[..., 2:].contiguous().view(torch.int8).float() * d).reshape(rows, cols)
    packed = b[..., 4:] if qtype == "Q4_1" else b[..., 2:]  # [rows, blocks, 16]: two 4-bit codes a byte
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1)  # values 0-15 of a block, then 16-31
    if qtype == "Q4_0":
        return (d * (q.to(torch.int8) - 8).float()).reshape(rows, cols)
    m = b[..., 2:4].contiguous().view(torch.float16).float()  # Q4_1: value = d * q + m
    return (d * q.float() + m).reshape(rows, cols)


class GGUFLinear(nn.Linear):
    """A linear layer whose frozen weight is a GGUF tensor's blocks as the file holds them
    ([out, bytes per row] uint8, rows in transformers' order), dequantised to `compute_dtype`
    (else the input's) for each matmul."""

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype | None) -> None:  # fmt: skip
        nn.Module.__init__(self)  # not nn.Linear's: no float weight to allocate
        self.in_features, self.out_features = in_features, blocks.shape[0]
        self.weight = nn.Parameter(blocks, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.qtype, self.compute_dtype = qtype, compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantized_linear(x, self)

    def dense(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (into `out` when given): each slice of rows
        dequantised in fp32, then cast."""
        if out is None:
            out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.weight.device)
        step = max(1, CHUNK_BYTES // (4 * self.in_features))
        for start in range(0, self.out_features, step):
            rows = slice(start, start + step)
            out[rows] = dequantize_blocks(self.weight[rows], self.qtype, self.in_features)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}"


def gguf_layers(model: nn.Module, gguf_file: str | Path, compute_dtype: torch.dtype, skip: set[str]) -> int:
    """Replace each plain `nn.Linear` of `model` (a transformers model loaded from `gguf_file`)
    whose weight the file holds quantised by a GGUFLinear of those blocks, in place; modules
    named in `skip` stay. Returns how many."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = gguf.GGUFReader(str(gguf_file))
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    keys = get_gguf_hf_weights_map(model, processor)  # GGUF tensor name -> transformers key
    count = 0
    for tensor in reader.tensors:
        module_name = keys.get(tensor.name, "").removesuffix(".weight")
        if tensor.tensor_type.name in FLOAT_TYPES or not module_name or module_name in skip:
            continue
        linear = model.get_submodule(module_name)
        if type(linear) is not nn.Linear or tuple(tensor.data.shape[:1]) != (linear.out_features,):
            continue
        rows = _row_order(processor, tensor.name, linear.out_features, keys)
        blocks = torch.from_numpy(np.ascontiguousarray(tensor.data[rows])).to(linear.weight.device)
        bias = None if linear.bias is None else linear.bias.data
        parent, _, child = module_name.rpartition(".")
        layer = GGUFLinear(blocks, tensor.tensor_type.name, linear.in_features, bias, compute_dtype)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        count += 1
    return count


def _row_order(processor, name: str, rows: int, keys: dict[str, str]) -> np.ndarray:
    """The order transformers' tensor processor puts the rows of GGUF tensor `name` in (LLaMA's
    q/k projections are stored permuted for llama.cpp's rotary layout): found by processing the
    row numbers themselves. Whole rows of blocks move, so the blocks stay exact."""
    index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    processed = processor.process(weights=index, name=name, tensor_key_mapping=keys,
                                  parsed_parameters={"config": processor.config, "tensors": {}})  # fmt: skip
    order = np.asarray(processed.weights)
    if processed.name != name or order.shape != (rows, 1) or sorted(order[:, 0]) != list(range(rows)):
        raise QuantizeError(f"transformers converts the GGUF tensor {name} in a way whole rows of blocks cannot "
                            "follow; this architecture cannot keep its GGUF blocks: use --quantize nf4")  # fmt: skip
    return order[:, 0].astype(np.int64)
