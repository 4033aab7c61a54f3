"""Weighted combination of adapter directories, straight from their files (no base model).

For every adapted module, the new update is Σ wᵢ·ΔWᵢ (see `functional.combine_factors`);
modules_to_save and bias tensors are averaged with the same weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from .._fs import atomic_write_json, atomic_write_with
from . import functional as LF
from .config import CONFIG_NAME, LoraConfig
from .io import WEIGHTS_NAME, read_adapter_weights
from .peft_keys import lora_modules, module_scaling


def combine_adapters(
    dirs: Sequence[str | os.PathLike],
    weights: Sequence[float],
    output: str | os.PathLike,
    combination: Literal["cat", "svd"] = "cat",
    rank: int | None = None,
) -> Path:
    """Write a new adapter directory whose update is Σ wᵢ·ΔWᵢ over the adapters in `dirs`."""
    if len(dirs) != len(weights) or not dirs:
        raise ValueError(f"give one weight per adapter: {len(dirs)} adapters, {len(weights)} weights")
    if combination not in ("cat", "svd"):
        raise ValueError(f"combination={combination!r}: use 'cat' (exact) or 'svd' (truncated to rank)")
    configs = [LoraConfig.from_pretrained(d) for d in dirs]
    states = [read_adapter_weights(d) for d in dirs]
    modules = [lora_modules(s) for s in states]
    rank = rank or max(c.r for c in configs)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path in sorted(set().union(*modules)):
        terms, shapes = [], None
        for config, state, mods, w in zip(configs, states, modules, weights):
            if path in mods:
                A, B = state[mods[path][0]], state[mods[path][1]]
                shapes = (A.shape, B.shape, mods[path])
                terms.append((A.flatten(1), B.flatten(1), w * module_scaling(config, path, A.shape[0])))
        A_new, B_new = LF.combine_factors(terms, combination, rank)
        (a_shape, b_shape, (a_key, b_key)), k = shapes, A_new.shape[0]
        dtype = terms[0][0].dtype
        out[a_key] = A_new.reshape(k, *a_shape[1:]).to(dtype).contiguous()
        out[b_key] = B_new.reshape(b_shape[0], k, *b_shape[2:]).to(dtype).contiguous()
        ranks[path] = k
    lora_keys = {k for mods in modules for pair in mods.values() for k in pair}
    for key in sorted({k for s in states for k in s} - lora_keys):  # heads and biases: averaged
        present = [(s[key], w) for s, w in zip(states, weights) if key in s]
        out[key] = sum(w * t.float() for t, w in present).to(present[0][0].dtype).contiguous()
    r = max(ranks.values(), default=rank)
    config = (
        configs[0]
        .replace(
            r=r,
            lora_alpha=r,
            use_rslora=False,
            enable_lora=None,
            rank_pattern={p: k for p, k in ranks.items() if k != r},
            alpha_pattern={p: k for p, k in ranks.items() if k != r},
        )
        .to_peft_dict()
    )
    # Full module paths: exact whatever layers or exclusions the inputs used.
    config.update(target_modules=sorted(ranks), layers_to_transform=None, exclude_modules=None)
    output = Path(output)
    atomic_write_with(output / WEIGHTS_NAME, lambda tmp: save_file(out, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(output / CONFIG_NAME, config)
    return output
