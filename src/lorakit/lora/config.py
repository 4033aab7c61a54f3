"""`LoraConfig`: one dataclass with PEFT's field names, validated at construction.

It serialises to `adapter_config.json` exactly as PEFT writes it, so an adapter directory
written by lorakit loads in PEFT and vice versa.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .principal import is_weight_init

CONFIG_NAME = "adapter_config.json"

# PEFT fields whose non-default value means a feature lorakit does not implement: refusing to
# load such an adapter beats silently computing something else.
_UNSUPPORTED_PEFT = {
    "layer_replication": None,
    "use_qalora": False,
    "lora_bias": False,
    "alora_invocation_tokens": None,
}


class ConfigError(ValueError):
    """A LoRA configuration value is invalid; the message names the field and the fix."""


@dataclass
class LoraConfig:
    """What to adapt and how. Field names follow PEFT's `LoraConfig`.

    r: rank of the update ΔW = B·A (A: [r, in], B: [out, r]).
    lora_alpha: scaling numerator; the update is scaled by alpha/r (alpha/√r with use_rslora).
    target_modules: a list of module names (exact, or a dotted suffix such as "query"), a regex
        string (full match against the module path), "all-linear" (every linear layer but the
        output head), or None for the architecture's default (the paper's Wq and Wv).
    exclude_modules: same forms as target_modules; matches are never adapted.
    lora_dropout: dropout on the adapter's input, in [0, 1).
    bias: which biases train with the adapter: "none", "all" or "lora_only".
    modules_to_save: modules trained in full and saved with the adapter (a new task head).
    init_lora_weights: True/"kaiming" (A Kaiming-uniform, PEFT's default), "gaussian"
        (A ~ N(0, 1/r), the paper's), False (B random too: a non-identity start, for tests), or
        from the base weight, which keeps the residual (principal.py): "pissa" (its principal
        singular directions), "pissa_niter_N" (randomised SVD, N iterations) or "olora" (QR).
    layers_to_transform / layers_pattern: adapt only these layer indices, found in the module
        path after `layers_pattern` (default: layers, layer, h, block, blocks).
    rank_pattern / alpha_pattern: {pattern: value} overrides per module (pattern is a regex
        matched against the end of the module path, as in PEFT).
    use_dora: DoRA (Liu et al. 2024): a trained magnitude per output row of each adapted
        linear layer (`lora_magnitude_vector`), the direction from W0 + s·B·A (dora.py).
    target_parameters: parameters to adapt where no layer holds them, by path or dotted suffix:
        the fused expert weights of MoE models, e.g. ["mlp.experts.gate_up_proj",
        "mlp.experts.down_proj"] (one rank-r update per expert; parameters.py). With it,
        target_modules=None means no modules (PEFT's rule), not the architecture's default.
    trainable_token_indices: token ids whose embedding rows train (new special tokens), saved as
        those rows alone (tokens.py): a list (the input embedding, and the output head when it
        shares its weight) or {"embed_tokens": [...], "lm_head": [...]}.
    enable_lora: lorakit's per-slice variant for fused projections (loralib's `enable_lora`):
        {pattern: [True, False, True]} adapts only the q and v slices of a fused qkv.
        Saved in PEFT's plain form (an equivalent rank-k·r adapter), so it is not serialised.
    """

    r: int = 8
    lora_alpha: float = 16
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    enable_lora: dict[str, list[bool]] | None = None
    use_dora: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self.target_modules = _as_names(self.target_modules)
        self.exclude_modules = _as_names(self.exclude_modules)
        self.target_parameters = list(self.target_parameters) if self.target_parameters else None
        self.modules_to_save = list(self.modules_to_save) if self.modules_to_save else None
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def _check_types(self) -> None:
        """The container and string fields hold what they claim (an adapter_config.json may
        hold anything): checked before they are converted or matched against module names."""
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            _check(
                value is None or isinstance(value, str) or _is_str_list(value),
                name,
                value,
                "a string, a list of strings, or null",
            )
        _check(
            self.target_parameters is None or _is_str_list(self.target_parameters),
            "target_parameters",
            self.target_parameters,
            'a list of parameter names, e.g. ["mlp.experts.gate_up_proj"], or null',
        )
        tokens = self.trainable_token_indices
        _check(
            tokens is None
            or _is_index_list(tokens)
            or (isinstance(tokens, dict) and all(isinstance(k, str) and _is_index_list(v) for k, v in tokens.items())),
            "trainable_token_indices",
            tokens,
            'token ids, e.g. [49152, 49153], or {"embed_tokens": [...]}, or null',
        )
        _check(
            self.modules_to_save is None or _is_str_list(self.modules_to_save),
            "modules_to_save",
            self.modules_to_save,
            'a list of module names, e.g. ["classifier"], or null',
        )
        _check(
            self.layers_to_transform is None or isinstance(self.layers_to_transform, (int, list, tuple)),
            "layers_to_transform",
            self.layers_to_transform,
            "a layer index, a list of them, or null",
        )
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            _check(
                isinstance(value, dict) and all(isinstance(k, str) for k in value),
                name,
                value,
                '{"module pattern": value}',
            )
        _check(
            self.enable_lora is None
            or (
                isinstance(self.enable_lora, dict)
                and all(isinstance(m, (list, tuple)) for m in self.enable_lora.values())
            ),
            "enable_lora",
            self.enable_lora,
            '{"module pattern": [True, False, True]} or null',
        )
        for name in ("use_rslora", "fan_in_fan_out", "inference_mode", "use_dora"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        for name in ("task_type", "base_model_name_or_path", "revision"):
            _check(
                getattr(self, name) is None or isinstance(getattr(self, name), str),
                name,
                getattr(self, name),
                "a string or null",
            )

    def validate(self) -> None:
        _check(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
            "r",
            self.r,
            "a positive integer rank, e.g. r=8",
        )
        _check(
            _is_number(self.lora_alpha) and self.lora_alpha > 0,
            "lora_alpha",
            self.lora_alpha,
            "a positive number, e.g. lora_alpha=16 (twice the rank is common)",
        )
        _check(
            _is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
            "lora_dropout",
            self.lora_dropout,
            "a probability in [0, 1), e.g. 0.05",
        )
        _check(self.bias in ("none", "all", "lora_only"), "bias", self.bias, 'one of "none", "all", "lora_only"')
        _check(
            self.init_lora_weights in (True, False, "kaiming", "gaussian") or is_weight_init(self.init_lora_weights),
            "init_lora_weights",
            self.init_lora_weights,
            'True, False, "kaiming", "gaussian", "pissa", "pissa_niter_N" (N subspace iterations) or "olora"',
        )
        if self.target_parameters:
            why = "0/false with target_parameters (an adapted parameter has no input of its own to drop out or rescale)"
            for name, on in (("lora_dropout", self.lora_dropout > 0), ("use_dora", self.use_dora)):
                _check(not on, name, getattr(self, name), why + "; adapt those parameters in a separate adapter")
            _check(not is_weight_init(self.init_lora_weights), "init_lora_weights", self.init_lora_weights,
                   "True, 'kaiming' or 'gaussian' with target_parameters")  # fmt: skip
        for key, value in self.rank_pattern.items():
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"rank_pattern[{key!r}]",
                value,
                "a positive integer rank",
            )
        for key, value in self.alpha_pattern.items():
            _check(_is_number(value) and value > 0, f"alpha_pattern[{key!r}]", value, "a positive number")
        for layer in self.layers_to_transform or []:
            _check(
                isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0,
                "layers_to_transform",
                self.layers_to_transform,
                "non-negative layer indices, e.g. [0, 1]",
            )
        for key, mask in (self.enable_lora or {}).items():
            _check(
                len(mask) > 0 and any(mask) and all(isinstance(m, bool) for m in mask),
                f"enable_lora[{key!r}]",
                mask,
                "a list of booleans with at least one True, e.g. [True, False, True]",
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all-linear":
                _check_regex(value, name, "pass a list of module names instead, e.g. ['q_proj', 'v_proj']")
        for name in ("rank_pattern", "alpha_pattern", "enable_lora"):
            for key in getattr(self, name) or {}:  # keys are regexes matched against module paths
                _check_regex(key, f"{name} key", "use a module name or a dotted path suffix")

    # -- serialisation in PEFT's format ------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content PEFT reads (lorakit-only fields left out)."""
        d = dataclasses.asdict(self)
        d.pop("enable_lora")
        d["target_modules"] = (
            sorted(d["target_modules"]) if isinstance(d["target_modules"], list) else d["target_modules"]
        )
        d.update(peft_type="LORA", lora_bias=False)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Build from an adapter_config.json dict (PEFT's or ours); PEFT-only fields at their
        defaults are ignored, a PEFT feature lorakit lacks (DoRA, ...) is a clear error."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"this adapter is of type {d['peft_type']!r}; lorakit loads LoRA adapters only")
        for key, default in _UNSUPPORTED_PEFT.items():
            if d.get(key, default) not in (default, None, False, [], {}):
                raise ConfigError(
                    f"the adapter uses PEFT's {key}={d[key]!r}, which lorakit does not "
                    "support; retrain or convert it as a plain LoRA adapter"
                )
        init = d.get("init_lora_weights")
        if init not in (True, False, "kaiming", "gaussian") and not is_weight_init(init):
            d = {**d, "init_lora_weights": True}  # PEFT's other inits only matter before training
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LoraConfig:
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {path}: is this an adapter directory? "
                "(lorakit and PEFT write one next to adapter_model.safetensors)"
            )
        try:
            # ValueError: bad JSON (JSONDecodeError), bad UTF-8, an integer of more than 4300
            # digits; RecursionError: arrays nested thousands deep. All are the file's fault.
            d = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"{file} is not valid JSON: {type(e).__name__}: {shorten(e)}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{file} must hold a JSON object, found {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from e
        except (TypeError, RecursionError) as e:  # a value of a type no check foresaw
            raise ConfigError(f"{file}: invalid value ({type(e).__name__}: {shorten(e)})") from e

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)


def _as_names(value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return list(value)


def _is_number(value: Any) -> bool:
    """A finite int or float: JSON allows NaN and 1e999 (inf), which would poison the scaling."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _is_index_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                    for v in value)  # fmt: skip


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


def _check_regex(pattern: str, name: str, hint: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression ({e}); {hint}") from e


def shorten(e: BaseException, limit: int = 200) -> str:
    """An exception's text cut to `limit` characters (a hostile file can make it huge)."""
    text = str(e)
    return text if len(text) <= limit else text[:limit] + "..."


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"LoraConfig.{name}={shorten(repr(value))} is invalid: expected {expected}")
