"""PEFT's names for an adapter's tensors: which module a key belongs to, A or B, and the
scaling each module's pair is applied with (read from the files alone, no base model)."""

from __future__ import annotations

import torch

from . import functional as LF
from .config import LoraConfig
from .targets import pattern_value

PREFIX = "base_model.model."
# (A key suffix, B key suffix) for linear/conv and for embedding layers, as PEFT names them.
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """{module path: (A key, B key)} of an adapter's LoRA tensors."""
    found = {}
    for key in state:
        for a_suffix, b_suffix in PAIRS:
            if key.endswith(a_suffix):
                found[key[len(PREFIX) : -len(a_suffix)]] = (key, key[: -len(a_suffix)] + b_suffix)
    return found


def module_scaling(config: LoraConfig, path: str, r: int) -> float:
    """The factor module `path`'s B·A is applied with: alpha / r, or alpha / sqrt(r) (rsLoRA),
    alpha from `alpha_pattern` where a pattern names the module."""
    alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
    return LF.lora_scaling(r, alpha, config.use_rslora)
