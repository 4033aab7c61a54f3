"""Saving and loading a method "like an adapter": only the tensors it trains.

    method_config.json          {"method", "settings", "head_modules", "base_model_name_or_path", "parameters"}
    method_model.safetensors    {parameter name in the applied model: tensor}, trained parameters only

LoRA is saved and loaded in PEFT's format exactly as before (`lorakit.save_adapter`).
Loading rebuilds the method on a fresh base from method_config.json, then copies the tensors
in, strictly: missing or unexpected names, other shapes, non-float or non-finite values are
errors naming the keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import lora
from .._fs import atomic_write_json, atomic_write_with
from ..lora.io import copy_checked, whole_tensor
from .apply import build, method_parameter_count, method_spec
from .errors import MethodError
from .prefix import PrefixModel

METHOD_CONFIG = "method_config.json"
WEIGHTS_NAME = "method_model.safetensors"


class MethodLoadError(MethodError):
    """A method directory does not fit the model, or its files are unreadable."""


def is_method_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a non-LoRA method (written by `save_method`)."""
    return (Path(path) / METHOD_CONFIG).is_file()


def method_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of what the method trains; whole tensors (a collective under FSDP)."""
    params = dict(model.named_parameters())
    return {n: whole_tensor(params[n]).detach().cpu().clone().contiguous() for n in _spec(model).params}


def method_config_dict(model: nn.Module) -> dict:
    spec = _spec(model)
    base = model.model if isinstance(model, PrefixModel) else model
    return {
        "method": spec.name,
        "settings": spec.settings,
        "head_modules": spec.head_modules,
        "base_model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        "parameters": method_parameter_count(model),
    }


def _spec(model: nn.Module):
    spec = method_spec(model)
    if spec is None:
        raise MethodError(f"no method was applied to this {type(model).__name__} (use lorakit.methods.build)")
    return spec


def save_method(model: nn.Module, path: str | os.PathLike, *, write: bool = True) -> Path:
    """Write what `model`'s method trains to directory `path` (LoRA: PEFT's adapter format).
    Under FSDP every process calls it; only the one with `write=True` writes. Files are
    written atomically."""
    if method_spec(model) is None:
        return lora.save_adapter(model, path, write=write)
    path = Path(path)
    state, config = method_state_dict(model), method_config_dict(model)
    if not write:
        return path
    atomic_write_with(path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(path / METHOD_CONFIG, config)
    return path


def read_method_config(path: str | os.PathLike) -> dict:
    file = Path(path) / METHOD_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {METHOD_CONFIG} in {path}")
    return json.loads(file.read_text())


def load_method(model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False) -> nn.Module:
    """Rebuild the method saved at `path` on the base `model` and load its tensors; returns
    the model to call (a PrefixModel for prefix methods). Frozen unless `is_trainable`.
    Load onto a fresh base: a directory that does not fit leaves the model changed."""
    config = read_method_config(path)
    try:
        state = load_file(str(Path(path) / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise MethodLoadError(f"{Path(path) / WEIGHTS_NAME} is not a readable safetensors file ({e})") from e
    try:
        root = build(model, config["method"], config["settings"], config["head_modules"])
    except MethodError as e:
        raise MethodLoadError(
            f"the {config['method']} model at {path} does not fit this {type(model).__name__}: {e}"
        ) from e
    _copy_into(root, state, path)
    if not is_trainable:
        root.requires_grad_(False)
    return root


def _copy_into(model: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    params = dict(model.named_parameters())
    targets = {name: params[name] for name in _spec(model).params}
    copy_checked(targets, state, path, MethodLoadError, made_for="another model or setting")
