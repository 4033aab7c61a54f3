"""LoRA wrappers. Each keeps the original module untouched as `base_layer` and holds, per
adapter name, A: [r, fan_in] and B: [out, r] (Conv2d: [r, in, kh, kw] and [out, r, 1, 1]).

    output = base_layer(x) + scaling · B·A·dropout(x)

State per adapter: `lora_A[name]`, `lora_B[name]`, `scaling[name]`, `dropout_p[name]`,
`variants[name]` (how the update enters: plain LoRA unless a variant says otherwise,
variants.py) and, for the per-slice variant of a fused projection, `slices[name]`.
This module holds the base class and the linear wrapper; embedding.py and conv.py the other
layer types; wrap.py which module gets which wrapper.
Exact merging lives in exact.py, mixed-batch routing in mixed.py, the math in functional.py,
whole modules trained per adapter (a new task head) in modules_to_save.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..quantize import dequantized_weight
from . import functional as LF
from .exact import ExactMerge, MergeError, MergesByName
from .mixed import AdapterStacks, MixedRows, gathered_forward, per_adapter_rows
from .principal import NITER, is_weight_init, principal_factors
from .variants import PLAIN, LoraVariant


class LoraLayer(MergesByName, nn.Module):
    """Base class: adapter bookkeeping, merge/unmerge, the forward skeleton."""

    fan_in: int  # set by each layer type
    fan_out: int

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.slices: dict[str, tuple[bool, ...] | None] = {}
        self.variants: dict[str, LoraVariant] = {}
        self.initial: dict[str, tuple[Tensor, Tensor]] = {}  # PiSSA/OLoRA: (A0, B0) taken out of W
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.mixed: MixedRows | None = None
        self.exact = ExactMerge()
        self.stacks = AdapterStacks()

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.fan_in), (self.fan_out, r)

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def max_rank(self) -> int:
        """The largest useful rank: beyond min(fan_in, fan_out), ΔW = B·A is no longer low-rank."""
        return min(self.fan_in, self.fan_out)

    @property
    def quantized(self) -> bool:
        """The base weight is held in packed integer blocks (bitsandbytes NF4/int8, ...): the
        base layer computes its own output, and an in-place merge is refused."""
        return not self.weight.is_floating_point()

    @property
    def adapter_dtype(self) -> torch.dtype:
        """A and B follow a float base weight's dtype; on a quantised base they stay fp32 (as
        PEFT keeps them), and the compute casts them to the activations' dtype."""
        return torch.float32 if self.quantized else self.weight.dtype

    def dense_weight(self) -> Tensor:
        """The base weight that merging writes into. A quantised base cannot take ΔW in place:
        rounding it into 4/8-bit blocks would change the model and could not be undone."""
        if self.quantized:
            raise MergeError(
                f"the base layer {type(self.base_layer).__name__} holds a quantised weight "
                f"({self.weight.dtype}); merging in place would round ΔW into its blocks and could not be "
                "undone exactly. Keep the adapter unmerged (mixed_batch and set_adapter work as they are), or "
                "load the base unquantised to merge"
            )
        return self.weight

    # -- adapters --------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: bool | str = True,
        slices: Sequence[bool] | None = None,
        variant: LoraVariant = PLAIN,
    ) -> None:
        """Create adapter `name`: A random (Kaiming-uniform or Gaussian), B zero, so the
        wrapped layer starts out computing exactly what the base layer computes."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        if self.initial:  # PiSSA/OLoRA left a residual in W: a new adapter would be added to the wrong base
            raise ValueError(
                f"this layer's base weight holds the residual of {', '.join(self.initial)}'s PiSSA/OLoRA init; "
                "another adapter cannot share it: load the PiSSA/OLoRA adapter in its plain-LoRA form (what "
                "save_adapter writes) to mix it with others"
            )
        if r > self.max_rank:
            raise ValueError(
                f"rank r={r} exceeds this layer's size ({self.fan_out}x{self.fan_in}); use r <= {self.max_rank}"
            )
        a_shape, b_shape = self._lora_shapes(r)
        if slices is not None:  # k enabled slices, each its own rank-r pair
            if self.fan_out % len(slices):
                raise ValueError(
                    f"enable_lora mask of length {len(slices)} does not divide the "
                    f"layer's {self.fan_out} outputs into equal slices"
                )
            a_shape = (sum(slices) * r, *a_shape[1:])
            b_shape = (sum(slices) * self.fan_out // len(slices), r)
        dtype, device = self.adapter_dtype, self.weight.device
        A = torch.empty(a_shape, dtype=dtype, device=device)
        B = torch.zeros(b_shape, dtype=dtype, device=device)
        self._init_pair(A, B, r, init)
        self.lora_A[name], self.lora_B[name] = nn.Parameter(A), nn.Parameter(B)
        self.scaling[name] = LF.lora_scaling(r, alpha, use_rslora)
        self.dropout_p[name] = float(dropout)
        self.slices[name] = tuple(slices) if slices is not None else None
        if is_weight_init(init):  # PiSSA / OLoRA: A, B from W, which keeps the residual
            self.init_from_weight(name, init)
        self.variants[name] = variant
        variant.create(self, name)
        self.stacks.clear()
        if not self.active_adapters:
            self.active_adapters = [name]

    def _init_pair(self, A: Tensor, B: Tensor, r: int, init: bool | str) -> None:
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:  # non-identity start: lets tests see the adapter's effect
            nn.init.normal_(B, std=0.02)

    def init_from_weight(self, name: str, init: str) -> None:
        raise ValueError(
            f"init_lora_weights={init!r} takes A and B from a linear layer's weight; this target is of type "
            f"{type(self.base_layer).__name__}: leave it out of target_modules or use the default init"
        )

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.set_merged([n for n in self.merged_adapters if n != name])
        if name in self.initial:  # PiSSA/OLoRA: W gets back what the init took out of it
            A0, B0 = self.initial.pop(name)
            self.add_to_base_weight(self.scaling[name] * (B0.float() @ A0.float()))
        if name in self.variants:
            self.variants[name].delete(self, name)
        for store in (self.lora_A, self.lora_B):
            del store[name]
        for store in (self.scaling, self.dropout_p, self.slices, self.variants):
            store.pop(name, None)  # (a half-made adapter, rolled back, lacks the later ones)
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self.stacks.clear()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def own_parameters(self, name: str) -> list[nn.Parameter]:
        """Adapter `name`'s parameters on this layer: A, B and its variant's (DoRA's magnitude)."""
        return [self.lora_A[name], self.lora_B[name], *self.variants[name].parameters(self, name).values()]

    def rank(self, name: str) -> int:
        """The effective rank of ΔW's factorisation (k·r for a per-slice adapter)."""
        return self.lora_A[name].shape[0]

    def A_matrix(self, name: str) -> Tensor:
        """A as a matrix: [r, fan_in]."""
        return self.lora_A[name].flatten(1)

    def B_matrix(self, name: str) -> Tensor:
        """B as a matrix: [fan_out, r] (a per-slice B expanded to the whole fused output)."""
        B = self.lora_B[name].flatten(1)
        mask = self.slices[name]
        return B if mask is None else LF.expand_sliced_B(B, mask, B.shape[1])

    def set_adapter_weights(self, name: str, A: Tensor, B: Tensor, scaling: float) -> None:
        """Replace adapter `name` with plain (not per-slice) factors: A: [r, fan_in], B: [fan_out, r]."""
        a_shape, b_shape = self._lora_shapes(A.shape[0])
        device, dtype = self.weight.device, self.adapter_dtype
        self.lora_A[name] = nn.Parameter(A.reshape(a_shape).to(device, dtype).contiguous())
        self.lora_B[name] = nn.Parameter(B.reshape(b_shape).to(device, dtype).contiguous())
        self.scaling[name] = scaling
        self.slices[name] = None
        self.variants.setdefault(name, PLAIN)
        self.dropout_p.setdefault(name, 0.0)
        self.stacks.clear()

    # -- merge ------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter `name` in fp32, in the base weight's layout (through its variant)."""
        return self.variants[name].delta_weight(self, name)

    def lora_delta(self, name: str) -> Tensor:
        """Plain LoRA's ΔW = scaling·B·A in fp32, in the base weight's layout."""
        return LF.delta_weight(self.A_matrix(name), self.B_matrix(name), self.scaling[name]).view(self.weight.shape)

    def set_merged(self, names: Iterable[str], safe: bool = True) -> None:
        """Make the base weight W0 + Σ ΔW over `names` (exact.py: rounded once, unmerged bit
        for bit); `safe` refuses a NaN/inf result and leaves the layer as it was."""
        names = [n for n in names if n in self.lora_A]
        if not names and not self.merged_adapters:
            return  # nothing merged, nothing to restore (and no base weight to touch)
        self.exact.apply(
            self.dense_weight(), [self.delta_weight(n) for n in names], safe, lambda: self._why_not_finite(names)
        )
        self.merged_adapters = names

    def _why_not_finite(self, names: Sequence[str]) -> str:
        broken = [n for n in names if not all(torch.isfinite(m).all() for m in (self.lora_A[n], self.lora_B[n]))]
        if broken:
            return (
                f"adapter(s) {broken} hold NaN or infinite weights; refusing to merge a broken adapter "
                "(retrain it, or resume from a checkpoint before the divergence)"
            )
        return (
            f"merging {list(names)} gives NaN or infinite values in the {self.weight.dtype} base weight (an "
            "overflow); merge into a float32 copy of the model, or keep the adapter unmerged"
        )

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.mixed is not None:
            if self.merged_adapters:
                raise RuntimeError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
            if self.mixed.uniform:  # every row on one adapter (or none): the ordinary path, no gathering
                name = self.mixed.only
                return self._adapter_forward(x, out, name) if name in self.lora_A else out
            return self._mixed_forward(x, out)
        names = [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]
        # A variant that reads the base output (DoRA) needs it apart from the sum: without
        # autograd, plain terms are accumulated into `out` in place.
        base = out.clone() if len(names) > 1 and any(self.variants[n].uses_base_output for n in names) else out
        for name in names:
            out = self._adapter_forward(x, out, name, base)
        return out

    def _adapter_forward(self, x: Tensor, out: Tensor, name: str, base: Tensor | None = None) -> Tensor:
        """out + adapter `name`'s term; `base` is the base layer's output (default: out itself)."""
        return self.variants[name].forward(self, name, x, out, out if base is None else base)

    def _mixed_forward(self, x: Tensor, out: Tensor) -> Tensor:
        if all(self.variants[n].gathered for n in self.mixed.names if n in self.variants):
            return gathered_forward(self, x, out)
        return per_adapter_rows(self, x, out, lambda name, xs, outs: self._adapter_forward(xs, outs, name))

    def dropout(self, x: Tensor, p: float) -> Tensor:
        return F.dropout(x, p, self.training) if p > 0 and self.training else x

    def lora_term(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        """Plain LoRA: out + scaling·dropout(x)·Aᵀ·Bᵀ. x: [..., in], out: [..., out]."""
        A, B = self.A_matrix(name), self.B_matrix(name)
        # Adapters run in the compute dtype (x's): cast the small A and B, never the activations.
        return LF.lora_forward(
            self.dropout(x, self.dropout_p[name]), out, A.to(x.dtype), B.to(x.dtype), self.scaling[name]
        )

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.adapter_names}
        return f"adapters={ranks}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """nn.Linear (weight [out, in]) or GPT-2 Conv1D (weight [in, out]: fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        if self.fan_in_fan_out:  # GPT-2 Conv1D: weight [in, out]
            self.fan_in, self.fan_out = base_layer.weight.shape
        else:  # from the features, not the weight: a quantised weight is stored packed
            self.fan_in, self.fan_out = base_layer.in_features, base_layer.out_features

    def lora_delta(self, name: str) -> Tensor:
        delta = LF.delta_weight(self.A_matrix(name), self.B_matrix(name), self.scaling[name])
        return delta.t() if self.fan_in_fan_out else delta

    def init_from_weight(self, name: str, init: str) -> None:
        """PiSSA/OLoRA (principal.py): A, B from W's principal part, W replaced by the rest."""
        others = [n for n in self.adapter_names if n != name]
        if self.quantized or self.slices[name] is not None or others:
            why = (
                f"a quantised ({self.weight.dtype}) weight cannot take the residual exactly: initialise on the "
                "full-precision base, or use the default init"
                if self.quantized
                else "per-slice adapters (enable_lora) are not supported with it"
                if self.slices[name] is not None
                else f"the adapters already on this layer ({', '.join(others)}) would see that residual too: give "
                "it a model of its own, or load its plain-LoRA form (what save_adapter writes)"
            )
            raise ValueError(f"init_lora_weights={init!r} replaces the base weight by a residual; {why}")
        if NITER.fullmatch(init):  # PEFT draws B's default init before its randomised SVD: the same
            nn.init.kaiming_uniform_(torch.empty(self.fan_out, self.rank(name)), a=math.sqrt(5))  # draws, same factors
        A, B = principal_factors(self.base_weight(), self.rank(name), self.scaling[name], init)
        with torch.no_grad():
            self.lora_A[name].copy_(A)
            self.lora_B[name].copy_(B)
        A0, B0 = self.lora_A[name].detach().clone(), self.lora_B[name].detach().clone()  # as stored
        self.add_to_base_weight(-self.scaling[name] * (B0.float() @ A0.float()))
        self.initial[name] = (A0, B0)

    @torch.no_grad()
    def add_to_base_weight(self, delta: Tensor) -> None:
        """W += delta ([out, in] fp32), summed in fp32 and rounded once."""
        W = self.base_weight()  # a view of the stored weight
        W.copy_(W.float() + delta)

    def base_weight(self) -> Tensor:
        """W0 as [out, in] (a view): the unmerged weight (exact.py's copy while anything is
        merged), a quantised one dequantised to fp32."""
        if self.quantized:
            return dequantized_weight(self.base_layer)
        W = self.exact.original if self.exact.original is not None else self.base_layer.weight
        return W.t() if self.fan_in_fan_out else W
