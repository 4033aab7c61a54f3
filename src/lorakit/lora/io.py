"""Adapter directories in PEFT's on-disk format, both ways.

    adapter_config.json          LoraConfig in PEFT's field names
    adapter_model.safetensors    base_model.model.<path>.lora_A.weight       A: [r, in]
                                 base_model.model.<path>.lora_B.weight       B: [out, r]
                                 base_model.model.<path>.lora_embedding_A    (embeddings)
                                 base_model.model.<path>.lora_magnitude_vector  m: [out] (DoRA)
                                 base_model.model.<path>.token_adapter.trainable_tokens_delta
                                                                 rows: [n, dim] (new tokens)
                                 base_model.model.<path>.<param>             (modules_to_save)
                                 base_model.model.<path>[.base_layer].bias   (bias="all"/"lora_only")
Only safetensors and JSON are read by default: loading an adapter never runs code.

Untrusted files. Whatever is wrong with an adapter directory's contents (truncated or
corrupted files, hostile safetensors headers, non-finite or non-float weights, unexpected
keys, wrong shapes, an adapter_config.json that is not JSON or holds wrong values),
`load_adapter` raises `AdapterLoadError` (a ValueError) naming the file and the problem;
for adapter_config.json it is `AdapterConfigError`, also a `ConfigError`. Only a missing
directory or file is a FileNotFoundError. Nothing is allocated beyond what the file holds:
safetensors checks every declared shape and offset against the file size before reading,
and the adapter's own tensors are bounded by the model's layer sizes (r <= min(in, out)).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._fs import atomic_write_json, atomic_write_with
from .adapters import delete_adapter
from .config import CONFIG_NAME, ConfigError, LoraConfig, shorten
from .embedding import LoraEmbedding
from .gguf_adapter import GGUFAdapterError, is_gguf_adapter, read_gguf_adapter
from .inject import (
    add_adapter,
    bias_names,
    freeze_adapter,
    freeze_base,
    lora_configs,
    lora_layers,
    saved_modules,
    set_trainable,
    token_layers,
)
from .layers import LoraLayer
from .parameters import LoraParameter, parameter_key
from .peft_keys import PREFIX
from .principal import as_plain_lora
from .targets import TargetError, find_targets, pattern_value
from .tokens import SAVED_SUFFIX

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


# What an adapter's weights may hold: a float type torch can check for NaN and copy into the
# model (fp8 and fp4 cannot be checked with isfinite, integers and bools are not weights).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdapterLoadError(ValueError):
    """An adapter directory does not fit the model, or its files are unreadable."""


class AdapterConfigError(AdapterLoadError, ConfigError):
    """The adapter's adapter_config.json is unreadable or invalid (both families: a caller
    may catch either)."""


# -- keys ------------------------------------------------------------------------------------
def _lora_keys(path: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, LoraEmbedding):
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def _tensors(model: nn.Module, name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under their PEFT keys (live parameters, or for a per-slice
    adapter its equivalent plain B)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            a_key, b_key = _lora_keys(path, layer)
            out[a_key] = layer.lora_A[name]
            out[b_key] = layer.B_matrix(name).reshape(layer._lora_shapes(layer.rank(name))[1])
            for suffix, param in layer.variants[name].parameters(layer, name).items():
                out[f"{PREFIX}{path}.{suffix}"] = param  # DoRA's lora_magnitude_vector
    for path, tokens in token_layers(model):
        if name in tokens.adapter_names and tokens.owner is tokens:  # a tied head saves nothing of its own
            out[f"{PREFIX}{path}.{SAVED_SUFFIX}"] = tokens.rows[name]
    for path, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{key}"] = value
    for bias in bias_names(model, config):
        out[PREFIX + bias] = model.get_parameter(bias)
    return out


# -- save ------------------------------------------------------------------------------------
def adapter_state_dict(
    model: nn.Module, adapter_name: str = "default", *, as_lora: bool = True
) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name` as PEFT saves it: {PEFT key: tensor}. A PiSSA/OLoRA adapter comes
    as the plain LoRA adapter for the untouched base (rank doubled) unless `as_lora` is False."""
    config = _config(model, adapter_name)
    tensors = _tensors(model, adapter_name, config)
    if as_lora:
        tensors.update(_plain_factors(model, adapter_name))
    return {k: whole_tensor(v).detach().clone().contiguous() for k, v in tensors.items()}


def _plain_factors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT's conversion of the PiSSA/OLoRA layers: A' = [A; A0], B' = [B, -B0] (principal.py)."""
    out = {}
    for path, layer in lora_layers(model):
        if name in layer.initial:
            a_key, b_key = _lora_keys(path, layer)
            out[a_key], out[b_key] = as_plain_lora(layer.lora_A[name], layer.lora_B[name], *layer.initial[name])
    return out


def _converted(model: nn.Module, name: str) -> bool:
    return any(name in layer.initial for _, layer in lora_layers(model))


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor sharded across processes (FSDP's DTensor) gathered whole, a plain tensor as it
    is. A collective under FSDP: every rank must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_config_dict(model: nn.Module, adapter_name: str = "default", *, as_lora: bool = True) -> dict:
    """The adapter_config.json for `adapter_name`: target_modules written so PEFT selects
    exactly the wrapped modules, and rank/alpha written per module wherever a layer's actual
    rank or scaling differs from what the config says (per-slice and combined adapters). A
    PiSSA/OLoRA adapter `as_lora`: a plain one of twice the rank (scaling unchanged), as PEFT's
    conversion writes it."""
    config = _config(model, adapter_name)
    layers = {path: layer for path, layer in lora_layers(model) if adapter_name in layer.lora_A}
    # an adapted parameter goes by its own path in target_parameters and the patterns
    parameters = {parameter_key(path, layer): layers.pop(path) for path, layer in list(layers.items())
                  if isinstance(layer, LoraParameter)}  # fmt: skip
    factor = 2 if as_lora and _converted(model, adapter_name) else 1
    if factor == 2:
        grow = 2**0.5 if config.use_rslora else 2  # alpha/r (or alpha/√r) stays the same
        config = config.replace(
            init_lora_weights=True,
            r=2 * config.r,
            lora_alpha=grow * config.lora_alpha,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()},
        )
    spec = _target_spec(model, config, layers) if layers else ([] if parameters else config.target_modules)
    d = config.replace(enable_lora=None, target_modules=spec).to_peft_dict()
    for path, layer in {**layers, **parameters}.items():
        r = layer.rank(adapter_name) * factor
        alpha = layer.scaling[adapter_name] * (r**0.5 if config.use_rslora else r)
        if r != pattern_value(path, config.rank_pattern, config.r):
            d["rank_pattern"][path] = r
        if abs(alpha - pattern_value(path, config.alpha_pattern, config.lora_alpha)) > 1e-9 * alpha:
            d["alpha_pattern"][path] = alpha
    d["fan_in_fan_out"] = any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values())
    if d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return d


def _target_spec(model: nn.Module, config: LoraConfig, layers: dict) -> list[str] | str:
    """Short leaf names ("query", "value") when they reproduce exactly the wrapped set under the
    saved exclude/layers settings; otherwise the full module paths (always exact)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in layers})
    try:
        found = {t.name for t in find_targets(model, config.replace(target_modules=leaves, enable_lora=None))}
    except TargetError:
        found = set()
    return leaves if found == set(layers) else sorted(layers)


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *, write: bool = True,
    as_lora: bool = True,
) -> Path:  # fmt: skip
    """Write adapter `adapter_name` to directory `path` in PEFT's format. Each file is
    written atomically (temp file + rename): an interrupted save leaves the old files intact.

    A PiSSA/OLoRA adapter is written as the plain LoRA adapter for the untouched base (rank
    doubled: PEFT's conversion), which any runtime loads; `as_lora=False` writes it as trained,
    for the residual base (loading it redoes the init on the base, as PEFT does).

    Under FSDP every process must call it (the adapter is gathered whole); only the one with
    `write=True` (rank 0) writes."""
    path = Path(path)
    state = adapter_state_dict(model, adapter_name, as_lora=as_lora)
    config = adapter_config_dict(model, adapter_name, as_lora=as_lora)
    if not write:
        return path
    atomic_write_with(path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_NAME, config)
    return path


def _config(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = lora_configs(model)
    if adapter_name not in configs:
        raise KeyError(f"the model has no adapter {adapter_name!r}; it has: {list(configs) or 'none'}")
    return configs[adapter_name]


# -- load ------------------------------------------------------------------------------------
def read_adapter_weights(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory. safetensors only, unless `allow_pickle`: then a
    legacy adapter_model.bin is read with torch.load(weights_only=True), which runs no code."""
    path = Path(path)
    file = path / WEIGHTS_NAME
    if not file.is_file():
        legacy = path / PICKLE_WEIGHTS_NAME
        if legacy.is_file() and allow_pickle:
            return _read_pickle(legacy)
        if legacy.is_file():
            raise AdapterLoadError(
                f"{path} holds only a pickle file ({PICKLE_WEIGHTS_NAME}); pickle can run "
                "code, so lorakit does not read it by default. Pass allow_pickle=True "
                "(read with weights_only=True) or convert it to safetensors"
            )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    try:
        # safetensors validates the header (shapes, dtypes, offsets) against the file size
        # before it reads a tensor, so a hostile header cannot make it allocate more than the file.
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterLoadError(
            f"{file} is not a readable safetensors file ({shorten(e)}); it may be truncated "
            "or corrupted: save the adapter again"
        ) from e


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A torch.save file read with weights_only=True (no code runs), after checks that bound
    what it can allocate: torch's zip format only (the legacy format allocates each storage at
    its declared size before reading it), records stored uncompressed (no zip bomb) and no
    bigger in total than the file."""
    size = file.stat().st_size
    try:
        with zipfile.ZipFile(file) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise AdapterLoadError(
            f"{file} is not in torch.save's zip format ({shorten(e)}); lorakit reads only "
            "that pickle format: convert the adapter to safetensors"
        ) from e
    if any(r.compress_type != zipfile.ZIP_STORED for r in records) or sum(r.file_size for r in records) > size:
        raise AdapterLoadError(
            f"{file} holds compressed or oversized records, which torch.save never writes; refusing to read it"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure is the file's fault
        raise AdapterLoadError(f"{file} could not be read safely: {shorten(e)}") from e
    if not (
        isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise AdapterLoadError(f"{file} does not hold a {{name: tensor}} dict; not an adapter's weights")
    return state


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    is_trainable: bool = False,
    allow_pickle: bool = False,
) -> nn.Module:
    """Load the adapter at `path` (written by lorakit or PEFT) as `adapter_name` (default
    "default"), wrapping the model's modules first where they are not wrapped yet.

    Strict: missing or unexpected keys, shapes or ranks that differ, non-finite or non-float
    weights, or an adapter made for another architecture raise AdapterLoadError naming the
    keys; nothing is half-loaded. The first adapter of a model becomes active; later ones
    are activated with `set_adapter`. Frozen unless `is_trainable`. `path` may also be a
    llama.cpp LoRA GGUF file (gguf_adapter.py), read into the same form."""
    name = adapter_name or "default"
    config, state = _read(path, model, allow_pickle)
    try:
        add_adapter(model, config, name)
    except TargetError as e:
        raise AdapterLoadError(
            f"the adapter at {path} (made for {config.base_model_name_or_path or 'an unknown base'}) "
            f"does not fit this {type(model).__name__}: {e}"
        ) from e
    except ConfigError:
        raise  # the adapter name: the caller's argument, not the file
    except ValueError as e:  # a rank larger than a layer, a slice mask that does not fit, ...
        raise AdapterConfigError(f"{Path(path) / CONFIG_NAME} does not fit this {type(model).__name__}: {e}") from e
    try:
        _copy_into(model, name, config, state, path)
    except BaseException:
        delete_adapter(model, name)  # nothing half-loaded stays behind
        raise
    if is_trainable:
        set_trainable(model, name)
    else:
        freeze_base(model)
        freeze_adapter(model, name)
    return model


def _read(path, model: nn.Module, allow_pickle: bool) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter's config and tensors in PEFT's form, from its directory or a GGUF LoRA file."""
    if is_gguf_adapter(path):
        try:
            return read_gguf_adapter(path, model)
        except GGUFAdapterError as e:
            raise AdapterLoadError(str(e)) from e
    try:
        config = LoraConfig.from_pretrained(path)
    except ConfigError as e:
        raise AdapterConfigError(str(e)) from e
    return config, read_adapter_weights(path, allow_pickle)


def _copy_into(model: nn.Module, name: str, config: LoraConfig, state: dict[str, torch.Tensor], path) -> None:
    hint = f" (adapter_config.json says r={config.r}; a rank or base-model size mismatch)"
    copy_checked(_tensors(model, name, config), state, path, AdapterLoadError, "another model or config", hint)


@torch.no_grad()
def copy_checked(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path, error: type[Exception],
                 made_for: str, shape_hint: str = "") -> None:  # fmt: skip
    """Copy `state` into the model tensors `targets` (both keyed by name), all or nothing: the
    key sets must be equal, and every tensor of the right shape, a float type (a non-float
    buffer its own type) and finite. `error(message)` names `path` and what is wrong."""
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise error(
            f"{path} does not match the model: "
            f"{_few('missing', missing)}{'; ' if missing and unexpected else ''}"
            f"{_few('unexpected', unexpected)}. Was it made for {made_for}?"
        )
    # Shapes and dtypes of every tensor first (cheap), then values: a bad file costs no
    # full pass over its tensors, and nothing is copied unless all of them pass.
    for key, target in targets.items():
        value = state[key]
        if value.shape != target.shape:
            raise error(
                f"{path}: {key}: the file has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}{shape_hint}"
            )
        # A float parameter takes any float type torch can check and cast; a non-float buffer
        # of a saved module (BatchNorm's step count) exactly its own type.
        ok = value.dtype in WEIGHT_DTYPES if target.is_floating_point() else value.dtype == target.dtype
        if not ok:
            raise error(f"{path}: {key} has dtype {value.dtype}; weights must be float16, bfloat16, float32 or float64")
    for key in targets:
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise error(f"{path}: {key} holds NaN or infinite values; refusing to load a broken adapter")
    for key, target in targets.items():
        target.copy_(state[key])


def _few(label: str, keys: list[str], limit: int = 5) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {label} key(s): {', '.join(keys[:limit])}{more}"
