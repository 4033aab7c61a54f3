"""Checks that need more than the options themselves (the file system, the loaded model), run
by `train` before the first optimizer step so a bad run fails in seconds, not after an hour.

`TrainConfig.validate` checks each option alone; here: can we write the output, does the model
have the layers `--targets` names and are they larger than `--rank`, does the disk hold the
checkpoints. Every error is a TrainConfigError naming the option, its value and the fix
(docs/validation.md lists them all).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from ..lora.layers import LoraLinear
from ..lora.targets import (
    TargetError,
    candidate_names,
    expert_names,
    find_parameter_targets,
    find_targets,
    name_matches,
)
from ..lora.wrap import wrap
from ..methods import lora_config
from .config import TrainConfig, TrainConfigError


def check_output_dir(config: TrainConfig) -> Path:
    """Create `--output` if needed and prove we can write there (a real temp file, since
    permission bits say nothing for root or on read-only mounts)."""
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise TrainConfigError(
            f"--output={config.output!r} is invalid: it is a file, expected a directory; choose another --output"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as e:
        raise TrainConfigError(
            f"--output={config.output!r} is invalid: it is not writable ({e.strerror or e}); "
            "choose a directory you can write to"
        ) from e
    return output


def check_lora_targets(config: TrainConfig, model: nn.Module, new_modules: Sequence[str]) -> None:
    """--targets must each name modules of this model, and --rank must not exceed the size of
    any targeted layer (beyond it ΔW = B·A is no longer low-rank: only wasted parameters)."""
    if config.method != "lora":
        return
    if isinstance(config.targets, list):
        names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
        unknown = [t for t in config.targets if not any(name_matches(n, [t]) for n in names)]
        if unknown:
            experts = expert_names(model)
            raise TrainConfigError(
                f"--targets={','.join(config.targets)!r} is invalid: {', '.join(map(repr, unknown))} "
                f"matches no module of this {type(model).__name__}; candidate module names: "
                f"{', '.join(candidate_names(model))}"
                + (f"; expert parameters: {', '.join(experts)}" if experts else "")
            )
    lora = lora_config(config, new_modules, model)
    try:
        targets = find_targets(model, lora)
        parameters = find_parameter_targets(model, lora)
    except TargetError as e:
        raise TrainConfigError(f"--targets={config.targets!r} is invalid: {e}") from e
    for t in parameters:  # one rank-r pair per expert
        size = min(t.shape[-2:])
        if t.r > size:
            raise TrainConfigError(
                f"--rank={t.r} is invalid: expected at most {size}, the smaller dimension of each expert in "
                f"{t.key} ({' x '.join(map(str, t.shape))}); lower --rank"
            )
    for t in targets:
        # A: [r, fan-in], B: [fan-out, r]; for a conv the fan-in includes the kernel.
        layer = wrap(t.module)
        if config.use_dora and not isinstance(layer, LoraLinear):
            raise TrainConfigError(
                f"--dora is invalid with --targets={config.targets!r}: DoRA is implemented for linear layers, and "
                f"{t.name} is of type {t.kind}; leave it out of --targets or drop --dora"
            )
        size = layer.max_rank
        if t.r > size:
            shape = " x ".join(map(str, t.module.weight.shape))
            raise TrainConfigError(
                f"--rank={t.r} is invalid: expected at most {size}, the smaller dimension of the "
                f"targeted layer {t.name} ({shape}); lower --rank"
            )


# Per trainable parameter, a checkpoint holds: the parameter, the adapter copy, and AdamW's
# two moments, all in the parameter's dtype. Plus the small files (configs, file headers)
# and trainer_state.json, whose log history grows by one record (~300 bytes) per step.
CHECKPOINT_COPIES = 4
FIXED_BYTES, BYTES_PER_STEP = 64_000, 300


def checkpoint_bytes(model: nn.Module, steps: int = 0) -> int:
    """Estimated size of one checkpoint of `model`'s trainable parameters after `steps` steps."""
    tensors = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return CHECKPOINT_COPIES * tensors + FIXED_BYTES + BYTES_PER_STEP * steps


def check_disk_space(config: TrainConfig, model: nn.Module) -> None:
    """The kept checkpoints, one being written before the oldest is pruned, and the output
    adapter must fit in the free space of --output."""
    each = checkpoint_bytes(model, config.max_steps or 0)
    need = (config.keep_checkpoints + 1) * each + each // CHECKPOINT_COPIES
    free = shutil.disk_usage(config.output).free
    if need > free:
        raise TrainConfigError(
            f"--keep-checkpoints={config.keep_checkpoints} is invalid: the checkpoints need about {_mb(need)} "
            f"({config.keep_checkpoints} kept + 1 being written, {_mb(each)} each, plus the adapter) but only "
            f"{_mb(free)} is free in --output={config.output!r}; free some space, lower --keep-checkpoints, "
            "or choose another --output"
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"
