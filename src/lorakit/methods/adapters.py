"""Bottleneck adapters: the four designs the LoRA paper compares against.

    adapter(h) = h + W_up · act(W_down · norm(h))       W_down: [m, d], W_up: [d, m]

W_up (and its bias) start at zero, so a fresh adapter is the identity and training starts from
the base model. Each adapter sits on the output of a projection, before the block's residual
sum (and, in BERT, before its LayerNorm):

    adapter-h     Houlsby et al. 2019: after the attention output projection and after the MLP,
                  no norm; per block 2·(d·m + m + m·d + d) parameters
    adapter-l     Lin et al. 2020: after the MLP only, with its own LayerNorm on the adapter's
                  input; per block d·m + m + m·d + d + 2·d
    adapter-p     Pfeiffer et al. 2021: after the MLP only, no norm, a ReLU bottleneck;
                  per block d·m + m + m·d + d
    adapter-drop  Rücklé et al. 2021 (AdapterDrop): Houlsby's, with the adapters of the lowest
                  `drop_layers` blocks left out (those blocks run as the base: faster, fewer parameters)
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..lora.architectures import ADAPTER_SITES
from ..lora.inject import set_submodule
from ..lora.targets import layer_index, name_matches
from .errors import MethodError


class Adapter(nn.Module):
    """h: [..., d] -> h + up(act(down(norm(h)))): [..., d], bottleneck m; the identity at init."""

    def __init__(self, d: int, m: int, layer_norm: bool = False, relu: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d) if layer_norm else nn.Identity()
        self.down = nn.Linear(d, m)  # [m, d]
        self.act = nn.ReLU() if relu else nn.GELU()
        self.up = nn.Linear(m, d)  # [d, m], zero: the adapter starts as the identity
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(self.norm(h))))


class WithAdapter(nn.Module):
    """`base_layer` (kept as it is) followed by an adapter on its output."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    @property
    def weight(self) -> Tensor:  # models that read `proj.weight.dtype` (T5) still can
        return self.base_layer.weight

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.adapter(self.base_layer(x, *args, **kwargs))


def out_features(module: nn.Module) -> int:
    """The width of a projection's output: nn.Linear's out_features, GPT-2 Conv1D's nf."""
    for attr in ("out_features", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    raise MethodError(f"cannot put an adapter after a {type(module).__name__}: it is not a linear projection")


def find_sites(model: nn.Module) -> tuple[list[str], list[str]]:
    """Paths of every block's attention output projection and MLP output projection, by the
    first layout in ADAPTER_SITES that the model has both of. The MLP pattern skips paths the attention
    pattern took (BERT's `output.dense` also ends `attention.output.dense`)."""
    names = [n for n, _ in model.named_modules() if n]
    for attention, mlp in ADAPTER_SITES.values():
        attn_sites = [n for n in names if name_matches(n, [attention])]
        mlp_sites = [n for n in names if name_matches(n, [mlp]) and n not in attn_sites]
        if attn_sites and mlp_sites:
            return attn_sites, mlp_sites
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = "; ".join(f"{arch}: {a} + {m}" for arch, (a, m) in ADAPTER_SITES.items())
    raise MethodError(
        f"adapters: cannot find the attention and MLP output projections of this "
        f"{type(model).__name__} (model type {model_type!r}). Known layouts: {known}"
    )


KINDS = ("houlsby", "lin", "pfeiffer", "drop")


def add_adapters(model: nn.Module, kind: str, adapter_size: int, drop_layers: int = 0) -> nn.Module:
    """Insert adapters of bottleneck `adapter_size` in every block, in place: "houlsby" (after
    attention and MLP), "lin" (after the MLP, with a LayerNorm), "pfeiffer" (after the MLP, ReLU,
    no norm) or "drop" (Houlsby's, none in the lowest `drop_layers` blocks)."""
    attn_sites, mlp_sites = find_sites(model)
    sites = attn_sites + mlp_sites if kind in ("houlsby", "drop") else mlp_sites
    if kind == "drop":
        blocks = sorted({layer_index(n, None) for n in sites} - {None})
        if not 0 <= drop_layers < len(blocks):
            raise MethodError(f"--adapter-drop-layers={drop_layers} is invalid: this model has {len(blocks)} "
                              f"blocks; drop 0 to {len(blocks) - 1} of them")  # fmt: skip
        sites = [n for n in sites if (layer_index(n, None) or 0) >= blocks[drop_layers]]
    for name in sites:
        base = model.get_submodule(name)
        weight = base.weight
        adapter = Adapter(out_features(base), adapter_size, layer_norm=kind == "lin", relu=kind == "pfeiffer")
        set_submodule(model, name, WithAdapter(base, adapter.to(weight.device, weight.dtype)))
    return model
