"""Mixed-adapter batches, layer side: row i of the batch runs through adapter `names[index[i]]`.

`MixedRows` says which adapter each row uses (set on every wrapper by `adapters.mixed_batch`);
`gathered_forward` runs a layer's rows through their adapters with one gathered batched matmul
(`functional.mixed_lora_forward`), from a stack of the layer's adapters that `AdapterStacks`
keeps while their weights do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import functional as LF

if TYPE_CHECKING:  # the layer type, for annotations only (layers.py imports this module)
    from .layers import LoraLayer


@dataclass
class MixedRows:
    """Which adapter each batch row uses: `names[index[i]]`, index == len(names) for none."""

    names: tuple[str, ...]
    index: Tensor  # [batch] long

    uniform: bool = field(init=False)  # every row on the same adapter (or every row on none)
    _routes: dict = field(init=False, default_factory=dict, repr=False)
    _bags: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.uniform = len(set(self.index.tolist())) <= 1

    @property
    def only(self) -> str | None:
        """The adapter of a uniform batch (None: the base alone)."""
        return self.names[0] if self.names else None

    def route(self, stacked: tuple[str, ...], batch: int, device: torch.device) -> Tensor:
        """[batch]: each row's slot in a layer stack of the adapters `stacked` (+ a final zero
        slot). Layers stacking the same adapters share it; decoding steps reuse it."""
        key = (stacked, batch, device)
        if key not in self._routes:
            slot = {n: i for i, n in enumerate(stacked)}
            to_stack = torch.tensor([slot.get(n, len(stacked)) for n in self.names] + [len(stacked)], device=device)
            self._routes[key] = to_stack[self.index_for(batch, device)]
        return self._routes[key]

    def bag_rows(self, route: Tensor, k: int) -> Tensor:
        """`LF.bag_rows(route, k)`, computed once per (route, k) for the whole batch: every
        layer and decoding step reuses it. Keyed by the route object, which `_routes` holds."""
        key = (id(route), k)
        if key not in self._bags:
            self._bags[key] = LF.bag_rows(route, k)
        return self._bags[key]

    def index_for(self, batch: int, device: torch.device) -> Tensor:
        index = self.index.to(device)
        if batch == len(index):
            return index
        if batch % len(index) == 0:  # generate() repeats rows for beams / num_return_sequences
            return index.repeat_interleave(batch // len(index))
        raise ValueError(
            f"mixed_batch was given {len(index)} adapter names but the batch has "
            f"{batch} rows; pass one name (or None) per row"
        )


class AdapterStacks:
    """A layer's adapters stacked for the gathered matmul: At: [n+1, fan_in, r_max] and
    Bt: [n+1, r_max, out] (absent adapters are zero). Cached when no gradient is needed,
    keyed on the parameters' version counters, so an optimizer step or a load invalidates it."""

    def __init__(self) -> None:
        self._cache: tuple | None = None  # (names, dtype, params, their versions, stacks)

    def clear(self) -> None:
        self._cache = None

    def get(self, layer: LoraLayer, names: tuple[str, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cache = self._cache
        # A decoding step calls this once per layer: the hit path reads only the version counters
        # (looking 2n parameters up in the ParameterDicts costs more than the matmuls).
        if cache is not None and cache[:2] == (names, dtype) and [p._version for p in cache[2]] == cache[3]:
            return cache[4]
        params = [p for n in names if n in layer.lora_A for p in (layer.lora_A[n], layer.lora_B[n])]
        zero_A = layer.weight.new_zeros(1, layer.fan_in, dtype=layer.adapter_dtype)
        zero_B = zero_A.new_zeros(layer.fan_out, 1)
        As = [layer.A_matrix(n) if n in layer.lora_A else zero_A for n in names]
        Bs = [layer.B_matrix(n) if n in layer.lora_A else zero_B for n in names]
        scalings = [layer.scaling.get(n, 0.0) for n in names]
        stacks = tuple(s.to(dtype) for s in LF.stack_adapters(As, Bs, scalings))
        if not torch.is_grad_enabled():
            self._cache = (names, dtype, params, [p._version for p in params], stacks)
        return stacks


def mixed_weights(
    layer: LoraLayer, batch: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked weights and each row's slot in them.

    Training stacks just the adapters of this batch (differentiable). Inference stacks every
    adapter the layer holds, once, and reuses it for any mix of rows: a server's batches
    change their adapter set all the time, the stack does not."""
    names = layer.mixed.names
    stacked = names if torch.is_grad_enabled() else tuple(layer.adapter_names)
    At, Bt = layer.stacks.get(layer, stacked, dtype)
    return At, Bt, layer.mixed.route(stacked, batch, device)


def mixed_dropout(layer: LoraLayer, x: Tensor) -> Tensor:
    """Training: the one lora_dropout the batch's adapters share (rows cannot differ)."""
    if not layer.training:
        return x
    ps = {layer.dropout_p[n] for n in layer.mixed.names if n in layer.lora_A}
    if len(ps) > 1:
        raise ValueError(f"mixed-batch training needs one lora_dropout for all adapters, got {sorted(ps)}")
    return layer.dropout(x, ps.pop() if ps else 0.0)


def gathered_forward(layer: LoraLayer, x: Tensor, out: Tensor) -> Tensor:
    """x: [b, ..., in], out: the base output [b, ..., out] -> with each row's own adapter added."""
    At, Bt, index = mixed_weights(layer, x.shape[0], x.device, x.dtype)
    return LF.mixed_lora_forward(mixed_dropout(layer, x), out, At, Bt, index, layer.mixed.bag_rows)


def per_adapter_rows(layer, x: Tensor, out: Tensor, term) -> Tensor:
    """The fallback for layers without a gathered form (convolutions, task heads): each
    adapter runs on its own rows. `term(name, x_rows, out_rows)` -> those rows' output."""
    index = layer.mixed.index_for(x.shape[0], x.device)
    out = out.clone()
    for i, name in enumerate(layer.mixed.names):
        rows = (index == i).nonzero().squeeze(1)
        if len(rows) and name in layer.adapter_names:
            out[rows] = term(name, x[rows], out[rows])
    return out
