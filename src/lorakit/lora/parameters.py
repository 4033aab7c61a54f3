"""LoRA on a parameter rather than a layer (PEFT's `target_parameters`): the fused expert
weights of a mixture-of-experts block, which transformers 5 stores as 3-D parameters of one
module instead of one nn.Linear per expert.

    gate_up_proj: [E, out, in] (used as F.linear(x, W[e]); `is_transposed` modules: [E, in, out])
    A: [E·r, in], row block e is expert e's A_e: [r, in]
    B: [out, r·E], column (k, e) at k·E + e: expert e's B_e: [out, r]    (PEFT's layout, as saved)
    ΔW[e] = s · B_e · A_e

The wrapper keeps the module as `base_layer` and, for the forward, hands it W + ΔW in place of
the parameter (torch.func.functional_call), so whatever kernel the module runs (an eager loop,
grouped_mm) sees the adapted weights and autograd reaches A and B. Several parameters of one
module nest one wrapper per parameter, the module's first parameter innermost, as PEFT nests
them: the saved keys are PEFT's (`experts.base_layer.lora_A.weight` for gate_up_proj). The
outermost wrapper runs the module once with every adapted parameter replaced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .layers import LoraLayer
from .variants import PLAIN


class LoraParameter(LoraLayer):
    """LoRA on `base_layer`'s parameter `parameter_name` (2-D [out, in], or 3-D experts)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        holder = self.holder
        W = getattr(holder, parameter_name)
        if W.dim() not in (2, 3):
            raise ValueError(f"{parameter_name} is a {W.dim()}-D parameter; LoRA adapts 2-D and 3-D (expert) ones")
        self.transposed = W.dim() == 3 and bool(getattr(holder, "is_transposed", False))
        self.num_experts = W.shape[0] if W.dim() == 3 else 1
        rows, cols = W.shape[-2:]
        self.fan_in, self.fan_out = (rows, cols) if self.transposed else (cols, rows)

    @property
    def holder(self) -> nn.Module:
        """The module that owns the parameter (below any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    @property
    def weight(self) -> Tensor:
        return getattr(self.holder, self.parameter_name)

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r * self.num_experts, self.fan_in), (self.fan_out, r * self.num_experts)

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0] // self.num_experts

    def add_adapter(self, name: str, r: int, alpha: float, **kwargs: Any) -> None:
        unsupported = {
            "lora_dropout": kwargs.get("dropout", 0.0) > 0,  # no input of its own to drop out
            "use_dora": kwargs.get("variant", PLAIN) is not PLAIN,
            "enable_lora": kwargs.get("slices") is not None,
        }
        if any(unsupported.values()):
            option = next(k for k, v in unsupported.items() if v)
            raise ValueError(f"{option} does not apply to an adapted parameter ({self.parameter_name}); drop it")
        super().add_adapter(name, r, alpha, **kwargs)

    def factors(self, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per expert: A_e: [E, r, in], B_e: [E, out, r]."""
        E = self.num_experts
        A = self.lora_A[name].to(dtype).view(E, -1, self.fan_in)
        B = self.lora_B[name].to(dtype).view(self.fan_out, -1, E).permute(2, 0, 1)
        return A, B

    def lora_delta(self, name: str) -> Tensor:
        """ΔW in fp32, the parameter's layout."""
        return self.add_delta(torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device), name)

    def add_delta(self, W: Tensor, name: str) -> Tensor:
        """W + ΔW of adapter `name`, in W's dtype, one batched GEMM over the experts."""
        A, B = self.factors(name, W.dtype)
        W3 = W.unsqueeze(0) if W.dim() == 2 else W  # [E, out, in] (or [E, in, out])
        if self.transposed:
            out = torch.baddbmm(W3, A.transpose(1, 2), B.transpose(1, 2), alpha=self.scaling[name])
        else:
            out = torch.baddbmm(W3, B, A, alpha=self.scaling[name])
        return out.view(W.shape)

    def chain(self) -> list[LoraParameter]:
        """This wrapper and those nested inside it, one per adapted parameter of the module."""
        chain, module = [], self
        while isinstance(module, LoraParameter):
            chain.append(module)
            module = module.base_layer
        return chain

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The outermost wrapper runs the module for the whole chain (inner ones are not called)."""
        if self.disabled:
            return self.holder(*args, **kwargs)
        if self.mixed is not None:
            if any(w.merged_adapters for w in self.chain()):
                raise RuntimeError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
            if not self.mixed.uniform:
                return self._mixed_forward(args, kwargs)
            return self._run([self.mixed.only] if self.mixed.only else [], args, kwargs)
        return self._run(self.active_adapters, args, kwargs)

    def _run(self, names: list[str], args: tuple, kwargs: dict) -> Any:
        """The module's own forward, each adapted parameter replaced by W + Σ ΔW over `names`
        (those of its wrapper's adapters not merged into it already)."""
        weights = {}
        for wrapper in self.chain():
            use = [n for n in names if n in wrapper.lora_A and n not in wrapper.merged_adapters]
            W = wrapper.weight
            for name in use:
                W = wrapper.add_delta(W, name)
            if use:
                weights[wrapper.parameter_name] = W
        if not weights:
            return self.holder(*args, **kwargs)
        return torch.func.functional_call(self.holder, weights, args, kwargs, strict=False)

    def _mixed_forward(self, args: tuple, kwargs: dict) -> Any:
        """Each adapter on its own tokens. The module's inputs are token rows ([batch·seq, ...]
        for an experts block), so every tensor argument with that many rows is split alike."""
        tokens = args[0].shape[0]
        index = self.mixed.index_for(tokens, args[0].device)
        out = None
        for slot, name in enumerate([*self.mixed.names, None]):
            rows = (index == slot).nonzero().squeeze(1)
            if not len(rows):
                continue

            part = self._run([name] if name else [], tuple(_rows(a, rows, tokens) for a in args),
                             {k: _rows(v, rows, tokens) for k, v in kwargs.items()})  # fmt: skip
            if out is None:
                out = part.new_zeros((tokens, *part.shape[1:]))
            out[rows] = part
        return out

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name}, experts={self.num_experts}, " + super().extra_repr()


def _rows(value: Any, rows: Tensor, tokens: int) -> Any:
    """`value`'s rows `rows` if it is a tensor of `tokens` rows (a per-token input), else `value`."""
    return value[rows] if isinstance(value, Tensor) and value.dim() and value.shape[0] == tokens else value


def parameter_key(path: str, layer: LoraParameter) -> str:
    """The parameter's path as the user names it: `...experts.gate_up_proj` for a wrapper at
    `...experts.base_layer`."""
    while path.endswith(".base_layer"):
        path = path[: -len(".base_layer")]
    return f"{path}.{layer.parameter_name}"
