"""LoRA wrappers. Each keeps the original module untouched as `base_layer` and holds, per
adapter name, A: [r, fan_in] and B: [out, r] (Conv2d: [r, in, kh, kw] and [out, r, 1, 1]).

    output = base_layer(x) + scaling · B·A·dropout(x)

State per adapter: `lora_A[name]`, `lora_B[name]`, `scaling[name]`, `dropout_p[name]` and,
for the per-slice variant of a fused projection, `slices[name]` (which slices are adapted).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import functional as LF


class MergeError(ValueError):
    """A merge would write NaN or infinite values into the base weights; nothing was changed."""


def conv1d_type() -> type | None:
    """Hugging Face's GPT-2 `Conv1D` (a linear layer whose weight is stored [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the core
        return None
    return Conv1D


@dataclass
class MixedRows:
    """Which adapter each batch row uses: `names[index[i]]`, index == len(names) for none."""
    names: tuple[str, ...]
    index: Tensor  # [batch] long

    uniform: bool = field(init=False)     # every row on the same adapter (or every row on none)
    _routes: dict = field(init=False, default_factory=dict, repr=False)
    _bags: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.uniform = len(set(self.index.tolist())) <= 1

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
        if batch % len(index) == 0:   # generate() repeats rows for beams / num_return_sequences
            return index.repeat_interleave(batch // len(index))
        raise ValueError(f"mixed_batch was given {len(index)} adapter names but the batch has "
                         f"{batch} rows; pass one name (or None) per row")


class LoraLayer(nn.Module):
    """Base class: adapter bookkeeping, merge/unmerge, the forward skeleton."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.slices: dict[str, tuple[bool, ...] | None] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.mixed: MixedRows | None = None
        self._original_weight: Tensor | None = None   # held only while something is merged
        self._stack_cache: tuple | None = None

    # -- shapes, defined by each layer type ------------------------------------------------
    fan_in: int
    fan_out: int

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.fan_in), (self.fan_out, r)

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    # -- adapters --------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0,
                    use_rslora: bool = False, init: bool | str = True,
                    slices: Sequence[bool] | None = None) -> None:
        """Create adapter `name`: A random (Kaiming-uniform or Gaussian), B zero, so the
        wrapped layer starts out computing exactly what the base layer computes."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        if r > min(self.fan_in, self.fan_out):
            raise ValueError(f"rank r={r} exceeds this layer's size ({self.fan_out}x{self.fan_in}); "
                             f"use r <= {min(self.fan_in, self.fan_out)}")
        n_slices = 1
        if slices is not None:
            n_slices = sum(slices)
            if self.fan_out % len(slices):
                raise ValueError(f"enable_lora mask of length {len(slices)} does not divide the "
                                 f"layer's {self.fan_out} outputs into equal slices")
        a_shape, b_shape = self._lora_shapes(r)
        if slices is not None:   # k enabled slices, each its own rank-r pair
            a_shape = (n_slices * r, *a_shape[1:])
            b_shape = (n_slices * self.fan_out // len(slices), r)
        w = self.weight
        A = torch.empty(a_shape, dtype=w.dtype, device=w.device)
        B = torch.zeros(b_shape, dtype=w.dtype, device=w.device)
        self._init_pair(A, B, r, init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self._stack_cache = None
        self.scaling[name] = LF.lora_scaling(r, alpha, use_rslora)
        self.dropout_p[name] = float(dropout)
        self.slices[name] = tuple(slices) if slices is not None else None
        if not self.active_adapters:
            self.active_adapters = [name]

    def _init_pair(self, A: Tensor, B: Tensor, r: int, init: bool | str) -> None:
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:   # non-identity start: lets tests see the adapter's effect
            nn.init.normal_(B, std=0.02)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.set_merged([n for n in self.merged_adapters if n != name])
        for store in (self.lora_A, self.lora_B):
            del store[name]
        for store in (self.scaling, self.dropout_p, self.slices):
            store.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._stack_cache = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

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
        r = A.shape[0]
        a_shape, b_shape = self._lora_shapes(r)
        w = self.weight
        self.lora_A[name] = nn.Parameter(A.reshape(a_shape).to(w.device, w.dtype).contiguous())
        self.lora_B[name] = nn.Parameter(B.reshape(b_shape).to(w.device, w.dtype).contiguous())
        self.scaling[name] = scaling
        self.slices[name] = None
        self.dropout_p.setdefault(name, 0.0)
        self._stack_cache = None

    # -- merge ------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """scaling·B·A in fp32, in the base weight's layout."""
        return LF.delta_weight(self.A_matrix(name), self.B_matrix(name), self.scaling[name]).view(self.weight.shape)

    @torch.no_grad()
    def set_merged(self, names: Iterable[str], safe: bool = True) -> None:
        """Make the base weight W0 + Σ ΔW over `names`, computed in fp32 and rounded once.

        Exactness: the original W0 is kept aside while anything is merged (memory: one copy of
        this layer's weight), so unmerging restores it bit for bit in any dtype; repeated
        merge/unmerge cycles cannot drift.

        Safe merge (`safe`, PEFT's safe_merge, on by default): a result holding NaN or inf (a
        broken adapter, or an overflow of the base dtype) raises MergeError and leaves the
        layer as it was. The check is one pass over the weight, cheap next to the B·A product."""
        names = [n for n in names if n in self.lora_A]
        weight = self.weight
        if not names:
            if self._original_weight is not None:
                weight.copy_(self._original_weight)
                self._original_weight = None
            self.merged_adapters = []
            return
        original = self._original_weight if self._original_weight is not None else weight.detach().clone()
        merged = original.float()
        for name in names:
            merged = merged + self.delta_weight(name).to(merged.device)
        merged = merged.to(weight.dtype)
        if safe and not torch.isfinite(merged).all():
            raise MergeError(self._why_not_finite(names, weight.dtype))
        self._original_weight = original
        weight.copy_(merged)
        self.merged_adapters = names

    def _why_not_finite(self, names: Sequence[str], dtype: torch.dtype) -> str:
        broken = [n for n in names if not all(torch.isfinite(m).all() for m in (self.lora_A[n], self.lora_B[n]))]
        if broken:
            return (f"adapter(s) {broken} hold NaN or infinite weights; refusing to merge a broken adapter "
                    "(retrain it, or resume from a checkpoint before the divergence)")
        return (f"merging {list(names)} gives NaN or infinite values in the {dtype} base weight (an overflow); "
                "merge into a float32 copy of the model, or keep the adapter unmerged")

    def merge(self, names: Sequence[str] | None = None, safe: bool = True) -> None:
        names = self.active_adapters if names is None else names
        self.set_merged(dict.fromkeys([*self.merged_adapters, *names]), safe=safe)

    def unmerge(self) -> None:
        self.set_merged([])

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.mixed is not None:
            if self.merged_adapters:
                raise RuntimeError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
            if not self.mixed.uniform:
                return self._mixed_forward(x, out)
            # Every row on one adapter (or none): the ordinary path, no gathering.
            name = self.mixed.names[0] if self.mixed.names else None
            return self._adapter_forward(x, out, name) if name in self.lora_A else out
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                out = self._adapter_forward(x, out, name)
        return out

    def _dropout(self, x: Tensor, p: float) -> Tensor:
        return F.dropout(x, p, self.training) if p > 0 and self.training else x

    def _adapter_forward(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        A, B = self.A_matrix(name), self.B_matrix(name)
        # Adapters run in the compute dtype (x's): cast the small A and B, never the activations.
        x_in = self._dropout(x, self.dropout_p[name])
        return LF.lora_forward(x_in, out, A.to(x.dtype), B.to(x.dtype), self.scaling[name])

    def _stacks(self, names: tuple[str, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """At: [n+1, fan_in, r_max] and Bt: [n+1, r_max, out] for `names` (absent ones are zero);
        cached when no gradient is needed, keyed on the parameters' version counters so an
        update invalidates it."""
        cache = self._stack_cache          # (names, dtype, params, their versions, stacks)
        # A decoding step calls this once per layer: the hit path reads only the version counters
        # (looking 2n parameters up in the ParameterDicts costs more than the matmuls).
        if cache is not None and cache[:2] == (names, dtype) and [p._version for p in cache[2]] == cache[3]:
            return cache[4]
        params = [p for n in names if n in self.lora_A for p in (self.lora_A[n], self.lora_B[n])]
        zero_A = self.weight.new_zeros(1, self.fan_in)
        zero_B = zero_A.new_zeros(self.fan_out, 1)
        As = [self.A_matrix(n) if n in self.lora_A else zero_A for n in names]
        Bs = [self.B_matrix(n) if n in self.lora_A else zero_B for n in names]
        scalings = [self.scaling.get(n, 0.0) for n in names]
        stacks = tuple(s.to(dtype) for s in LF.stack_adapters(As, Bs, scalings))
        if not torch.is_grad_enabled():
            self._stack_cache = (names, dtype, params, [p._version for p in params], stacks)
        return stacks

    def _mixed_weights(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Stacked weights and each row's slot in them.

        Training stacks just the adapters of this batch (differentiable). Inference stacks
        every adapter this layer holds, once, and reuses it for any mix of rows: a server's
        batches change their adapter set all the time, the stack does not."""
        names = self.mixed.names
        stacked = names if torch.is_grad_enabled() else tuple(self.adapter_names)
        At, Bt = self._stacks(stacked, dtype)
        return At, Bt, self.mixed.route(stacked, batch, device)

    def _mixed_dropout(self, x: Tensor, names: tuple[str, ...]) -> Tensor:
        if not self.training:
            return x
        ps = {self.dropout_p[n] for n in names if n in self.lora_A}
        if len(ps) > 1 and self.training:
            raise ValueError(f"mixed-batch training needs one lora_dropout for all adapters, got {sorted(ps)}")
        return self._dropout(x, ps.pop() if ps else 0.0)

    def _mixed_forward(self, x: Tensor, out: Tensor) -> Tensor:
        At, Bt, index = self._mixed_weights(x.shape[0], x.device, x.dtype)
        return LF.mixed_lora_forward(self._mixed_dropout(x, self.mixed.names), out, At, Bt, index, self.mixed.bag_rows)

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.adapter_names}
        return f"adapters={ranks}, active={self.active_adapters}, merged={self.merged_adapters}"


# Train through `FusedLoraLinear` where it applies. Off by default: measured on this project's
# CPUs (benchmarks/e2e.py, bench.py) it did not beat F.linear + two small matmuls (whose oneDNN
# kernels are faster than the plain matmuls it uses); set True to measure it on other hardware.
FUSED_TRAINING = False


class LoraLinear(LoraLayer):
    """nn.Linear (weight [out, in]) or GPT-2 Conv1D (weight [in, out]: fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        w = base_layer.weight
        self.fan_out, self.fan_in = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape

    def delta_weight(self, name: str) -> Tensor:
        delta = LF.delta_weight(self.A_matrix(name), self.B_matrix(name), self.scaling[name])
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        name = self._fusable_adapter(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        A, B = self.A_matrix(name), self.B_matrix(name)
        base = self.base_layer
        return LF.fused_lora_linear(x, base.weight, base.bias, A.to(x.dtype), B.to(x.dtype), self.scaling[name])

    def _fusable_adapter(self, x: Tensor) -> str | None:
        """The one adapter the fused training path (`FusedLoraLinear`) can run, else None.
        It covers the common case exactly: a plain frozen nn.Linear (no hooks) in training,
        one active unmerged adapter without dropout, everything in x's dtype."""
        if not (FUSED_TRAINING and self.training and torch.is_grad_enabled()) or self.disabled or self.mixed is not None:
            return None
        base = self.base_layer
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return None
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        names = [n for n in self.active_adapters if n in self.lora_A]
        if len(names) != 1 or self.merged_adapters or self.dropout_p[names[0]] > 0:
            return None
        if x.dtype != base.weight.dtype or (base.bias is not None and base.bias.dtype != x.dtype):
            return None
        return names[0]


class LoraEmbedding(LoraLayer):
    """nn.Embedding (weight [num, dim]). A: [r, num], B: [dim, r]; as in PEFT, A starts at
    zero and B random (the rows of A are looked up, so A plays the input projection)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.fan_in, self.fan_out = base_layer.num_embeddings, base_layer.embedding_dim

    def _init_pair(self, A: Tensor, B: Tensor, r: int, init: bool | str) -> None:
        nn.init.normal_(B)
        if init is False:
            nn.init.normal_(A, std=0.02)
        else:
            nn.init.zeros_(A)

    def delta_weight(self, name: str) -> Tensor:
        return LF.delta_weight(self.A_matrix(name), self.B_matrix(name), self.scaling[name]).t()

    def _lookup(self, ids: Tensor, A: Tensor) -> Tensor:
        e = self.base_layer
        return F.embedding(ids, A.t(), e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def _adapter_forward(self, ids: Tensor, out: Tensor, name: str) -> Tensor:
        # The lookup replaces x·Aᵀ: h = A[:, ids]ᵀ -> [..., r]; no dropout on token ids.
        h = self._lookup(ids, self.A_matrix(name).to(out.dtype))
        return LF.lora_forward_h(h, out, self.B_matrix(name).to(out.dtype), self.scaling[name])

    def _mixed_forward(self, ids: Tensor, out: Tensor) -> Tensor:
        At, Bt, index = self._mixed_weights(ids.shape[0], ids.device, out.dtype)   # [n+1, num, r], [n+1, r, dim]
        rows = index.view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
        h = At[rows, ids]                                                 # [b, ..., r]
        b = ids.shape[0]
        delta = torch.bmm(h.reshape(b, -1, h.shape[-1]), Bt.index_select(0, index))
        return out + delta.view(out.shape)


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

    def _conv_pair(self, x: Tensor, name: str, scale: float) -> Tensor:
        c = self.base_layer
        A, B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        h = F.conv2d(self._dropout(x, self.dropout_p[name]), A, None, c.stride, c.padding, c.dilation)
        return F.conv2d(h, B * scale)

    def _adapter_forward(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        return out + self._conv_pair(x, name, self.scaling[name])

    def _mixed_forward(self, x: Tensor, out: Tensor) -> Tensor:
        # Convolutions have no gathered-bmm form; run each adapter on its rows only.
        index = self.mixed.index_for(x.shape[0], x.device)
        out = out.clone()
        for i, name in enumerate(self.mixed.names):
            rows = (index == i).nonzero().squeeze(1)
            if len(rows) and name in self.lora_A:
                out[rows] += self._conv_pair(x[rows], name, self.scaling[name])
        return out


class ModulesToSave(nn.Module):
    """A module trained in full per adapter (e.g. a new classification head).

    Keeps `original_module` and a copy per adapter in `modules_to_save[name]`, as PEFT does;
    on disk the active copy is saved under the module's original name."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.mixed: MixedRows | None = None

    def add_adapter(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[name] = copy_
        self.active_adapter = self.active_adapter or name

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.mixed is None or self.disabled:
            return self.active_module()(x, *args, **kwargs)
        if self.mixed.uniform:
            name = self.mixed.names[0] if self.mixed.names else None
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            return module(x, *args, **kwargs)
        # Heads are small: each adapter's copy runs on its own rows.
        index = self.mixed.index_for(x.shape[0], x.device)
        names = self.mixed.names
        out = self.original_module(x, *args, **kwargs).clone()
        for i, name in enumerate(names):
            rows = (index == i).nonzero().squeeze(1)
            if len(rows) and name in self.modules_to_save:
                out[rows] = self.modules_to_save[name](x[rows], *args, **kwargs)
        return out


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA wrapper for a supported layer; a clear error for anything else."""
    if isinstance(module, LoraLayer):
        return module
    if isinstance(module, nn.Linear) or (conv1d_type() and isinstance(module, conv1d_type())):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    raise TypeError(f"{type(module).__name__} is not a layer type LoRA can wrap; "
                    f"supported: {', '.join(SUPPORTED_TYPE_NAMES)}")


SUPPORTED_TYPE_NAMES = ("Linear", "Conv1D (GPT-2)", "Embedding", "Conv2d")


def is_supported(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)) or (conv1d is not None and isinstance(module, conv1d))
