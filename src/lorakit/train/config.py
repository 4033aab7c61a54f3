"""`TrainConfig`: every option of a training run, with sensible defaults, validated up front
(before any model is loaded) with messages that name the field, the value and the fix."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..lora.principal import is_weight_init
from ..methods import METHODS
from ..models import ModelError, gguf_source
from ..quantize import SCHEMES
from .data import DataError
from .defaults import fill_unset
from .tasks import REGISTRY, TASKS, check_prompt_template

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SCHEDULERS = ("linear", "cosine", "constant")


class TrainConfigError(ValueError):
    """A training option is invalid."""


@dataclass
class TrainConfig:
    # what
    model: str = "minilm"
    task: str = "classification"
    data: str = ""
    eval_data: str | None = None
    output: str = "runs/lorakit"
    method: str = "lora"
    # LoRA
    # rank, alpha, lr and targets left None are chosen per task and method (train/defaults.py)
    targets: list[str] | str | None = None  # None: the task's default (all-linear for every task now)
    rank: int | None = None  # default 8
    alpha: float | None = None  # default 16
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False  # DoRA: a trained magnitude per output row (Liu et al. 2024)
    init: str = "kaiming"  # or "gaussian" (the paper's), "pissa", "pissa_niter_N", "olora" (from W)
    add_tokens: list[str] | None = None  # new special tokens; only their embedding rows train
    # other methods
    adapter_size: int = 16  # adapter-h / -l / -p / -drop bottleneck m
    adapter_drop_layers: int = 1  # adapter-drop: the lowest blocks left without adapters
    prefix_length: int = 16  # prefix-embed / prefix-layer positions
    # optimisation
    lr: float | None = None  # default: per method, and for LoRA per task (2e-3 for every task now)
    lora_plus_ratio: float = 1.0  # LoRA+: B's learning rate = lr * ratio (16 in the paper)
    head_lr: float | None = None  # new task heads (modules_to_save); default lr
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 128
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    bf16: bool = False
    quantize: str | None = None  # nf4 | int8: the frozen base's linear layers held quantised (QLoRA)
    gradient_checkpointing: bool = False
    packing: bool = True  # causal-lm: padding-free batches (same gradients, no padding compute)
    group_by_length: bool | None = None  # length-grouped batches; None: on unless batches are packed
    attention: str | None = None  # attention kernel: sdpa | eager | ...; None: the model's default
    seed: int = 0
    device: str | None = None  # cpu | cuda | cuda:N; None: this process's GPU if there is one, else cpu
    # evaluation and checkpoints
    eval_every: int | None = None  # steps; None: only at the end
    eval_before: bool = True  # score the model before training too
    eval_generate: int = 0  # generation tasks: BLEU/ROUGE-L on this many inputs
    max_new_tokens: int = 64
    eval_batch_size: int = 32
    eval_loss_examples: int | None = (
        None  # generation tasks: eval loss on at most this many (all refs still score BLEU)
    )
    save_every: int | None = None  # steps; None: at eval points and the end
    keep_checkpoints: int = 2
    resume: bool = False
    # processes (torchrun): data parallel strategy
    distributed: str = "ddp"  # "ddp" (replicated base) or "fsdp" (sharded base)
    # data
    text_field: str | None = None
    pair_field: str | None = None
    label_field: str | None = None
    prompt_template: str | None = None  # causal-lm: each prompt placed in it at "{prompt}" (saved with the adapter)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    log_every: int = 1
    # what __post_init__ filled in from train/defaults.py (name -> value), for the console and the log
    defaults_chosen: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) and self.targets not in ("all-linear",) and "," in self.targets:
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        elif (
            isinstance(self.targets, str)
            and self.targets not in ("all-linear",)
            and not _looks_like_regex(self.targets)
        ):
            self.targets = [self.targets]
        if isinstance(self.add_tokens, str):
            self.add_tokens = [t.strip() for t in self.add_tokens.split(",") if t.strip()]
        if self.task in TASKS and self.method in METHODS:  # else validate() names the bad one
            self.defaults_chosen = fill_unset(self, self.task, self.method)
        self.validate()

    def validate(self) -> None:
        _need(self.task in TASKS, "task", self.task, f"one of {', '.join(TASKS)}")
        _need(bool(self.data), "data", self.data, "a training data file or dataset (--data train.jsonl)")
        _need(self.method in METHODS, "method", self.method, f"one of {', '.join(METHODS)}")
        for name in (
            "rank",
            "epochs",
            "batch_size",
            "grad_accum",
            "max_length",
            "eval_batch_size",
            "keep_checkpoints",
            "log_every",
            "max_new_tokens",
            "adapter_size",
            "prefix_length",
        ):
            value = getattr(self, name)
            _need(
                isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer"
            )
        for name in (
            "max_steps",
            "eval_every",
            "save_every",
            "max_train_examples",
            "max_eval_examples",
            "eval_loss_examples",
        ):
            value = getattr(self, name)
            _need(value is None or (isinstance(value, int) and value > 0), name, value, "a positive integer or unset")
        _need(self.alpha > 0, "alpha", self.alpha, "a positive number (e.g. twice the rank)")
        _need(0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)")
        _need(self.lr > 0 and self.lr < 1, "lr", self.lr, "a learning rate in (0, 1), e.g. 1e-3 for LoRA")
        _need(self.lora_plus_ratio >= 1, "lora_plus_ratio", self.lora_plus_ratio, ">= 1 (1 = plain LoRA, 16 = LoRA+)")
        _need(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        _need(self.scheduler in SCHEDULERS, "scheduler", self.scheduler, f"one of {', '.join(SCHEDULERS)}")
        _need(
            self.attention is None or self.attention in attention_kernels(),
            "attention",
            self.attention,
            f"one of {', '.join(attention_kernels())}",
        )
        _need(
            self.device is None or re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", str(self.device)) is not None,
            "device",
            self.device,
            "cpu, cuda or cuda:N (or unset: the GPU if there is one)",
        )
        _need(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 disables clipping)")
        _need(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _need(
            self.init in ("kaiming", "gaussian") or is_weight_init(self.init),
            "init",
            self.init,
            '"kaiming", "gaussian", "pissa", "pissa_niter_N" (randomised SVD, N iterations) or "olora"',
        )
        _need(self.eval_generate >= 0, "eval_generate", self.eval_generate, ">= 0")
        _need(
            isinstance(self.adapter_drop_layers, int) and self.adapter_drop_layers >= 0,
            "adapter_drop_layers",
            self.adapter_drop_layers,
            "a number of blocks >= 0",
        )
        _need(self.distributed in ("ddp", "fsdp"), "distributed", self.distributed, '"ddp" or "fsdp"')
        _need(self.quantize is None or self.quantize in SCHEMES, "quantize", self.quantize,
              f"one of {', '.join(SCHEMES)} (or unset: the base as loaded)")  # fmt: skip
        _need(
            self.head_lr is None or 0 < self.head_lr < 1, "head_lr", self.head_lr, "a learning rate in (0, 1), or unset"
        )
        self._validate_targets()
        self._validate_combinations()

    def _validate_targets(self) -> None:
        if isinstance(self.targets, list):
            _need(
                bool(self.targets) and all(isinstance(t, str) and t for t in self.targets),
                "targets",
                self.targets,
                "module names, e.g. query,value (or a regex, or all-linear)",
            )
        elif isinstance(self.targets, str) and self.targets != "all-linear":
            try:
                re.compile(self.targets)
            except re.error as e:
                raise TrainConfigError(
                    f"--targets={self.targets!r} is invalid: not a regular expression ({e}); "
                    "expected module names, e.g. query,value"
                ) from e

    def _validate_quantize(self) -> None:
        if self.method != "lora":
            raise TrainConfigError(f"--quantize={self.quantize!r} is invalid with --method={self.method}: a quantised "
                                   "weight cannot train; quantise only under --method lora")  # fmt: skip
        if is_weight_init(self.init):
            raise TrainConfigError(f"--quantize={self.quantize!r} is invalid with --init={self.init}: {self.init} "
                                   "replaces each base weight by a residual, which quantised blocks cannot take "
                                   "exactly; drop one of them")  # fmt: skip
        if self.distributed == "fsdp":
            raise TrainConfigError(f"--quantize={self.quantize!r} is invalid with --distributed fsdp: quantised "
                                   "packed weights do not shard; use --distributed ddp")  # fmt: skip
        if self.quantize == "gguf":
            self._validate_gguf()
        elif importlib.util.find_spec("bitsandbytes") is None:
            raise TrainConfigError(f"--quantize={self.quantize!r} needs bitsandbytes, which is not installed: "
                                   "pip install bitsandbytes (or pip install 'lorakit[quant]')")  # fmt: skip

    def _validate_gguf(self) -> None:
        if importlib.util.find_spec("gguf") is None:
            raise TrainConfigError("--quantize='gguf' needs the gguf package, which is not installed: pip install gguf")
        try:
            source = gguf_source(self.model)
        except ModelError:
            return  # the model check reports it
        if source is None:
            raise TrainConfigError(f"--quantize='gguf' is invalid with --model={self.model}: it keeps a GGUF file's "
                                   "own blocks, and this model is not a .gguf file (nor the smollm2-135m alias); "
                                   "use --quantize nf4 or int8")  # fmt: skip

    def _validate_prompt_template(self) -> None:
        if self.task != "causal-lm":
            raise TrainConfigError(
                f"--prompt-template is invalid with --task={self.task}: it wraps the prompts of causal-lm data; "
                "drop it, or put the wording into the text column"
            )
        try:
            check_prompt_template(self.prompt_template)
        except DataError as e:
            raise TrainConfigError(str(e)) from None

    def _validate_combinations(self) -> None:
        """Options that are fine alone but wrong together: each would be silently ignored."""
        if self.eval_generate and not REGISTRY[self.task].generative:
            raise TrainConfigError(
                f"--eval-generate={self.eval_generate} is invalid with --task={self.task}: BLEU/ROUGE-L "
                "score generated text (causal-lm, seq2seq only); drop --eval-generate"
            )
        if self.prompt_template is not None:
            self._validate_prompt_template()
        if self.eval_every and not self.eval_data:
            raise TrainConfigError(
                f"--eval-every={self.eval_every} is invalid without --eval-data: there is nothing to "
                "evaluate; give --eval-data, or use --save-every for checkpoints alone"
            )
        if self.quantize is not None:
            self._validate_quantize()
        if self.method != "lora":
            lora_only = {
                "targets": self.targets is not None,
                "use_rslora": self.use_rslora,
                "use_dora": self.use_dora,
                "init": self.init != "kaiming",
                "add_tokens": bool(self.add_tokens),
                "lora_plus_ratio": self.lora_plus_ratio != 1,
            }
            for name, given in lora_only.items():
                if given:
                    raise TrainConfigError(
                        f"--{name.replace('_', '-')}={getattr(self, name)!r} is invalid with "
                        f"--method={self.method}: it is a LoRA option; drop it or use --method=lora"
                    )
        if self.method.startswith("prefix") and self.gradient_checkpointing:
            raise TrainConfigError(
                f"--gradient-checkpointing is invalid with --method={self.method}: prefix methods "
                "change the attention inputs that checkpointing recomputes; drop one of them"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Options from a YAML or TOML file (keys = option names, '-' or '_'), then `overrides`."""
        return cls(**{**read_config_file(path), **{k: v for k, v in overrides.items() if v is not None}})


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = (
            tomllib.loads(text)
            if path.suffix == ".toml"
            else (json.loads(text) if path.suffix == ".json" else yaml.load(text, _NoAliasLoader))
        )
    # ValueError: bad UTF-8, an integer of more than 4300 digits (and JSON's own errors);
    # RecursionError: lists nested thousands deep. All are the file's fault.
    except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError, RecursionError) as e:
        message = str(e) if len(str(e)) < 300 else str(e)[:300] + "..."
        raise TrainConfigError(f"config file {path} could not be parsed: {type(e).__name__}: {message}") from e
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise TrainConfigError(f"config file {path} must hold a mapping of option: value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TrainConfigError(
            f"config file {path}: unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(fields))}"
        )
    for key, value in data.items():
        expected = str(fields[key].type)
        if not _has_type(value, expected):
            raise TrainConfigError(f"config file {path}: {key}={value!r:.100} is invalid: expected {expected}")
    return data


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: nested aliases (a "billion laughs" file) cost
    nothing to parse but expand exponentially when the config is copied (to_dict)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(
                f"YAML aliases (*name) are not allowed in a training config ({self.peek_event().start_mark})"
            )
        return super().compose_node(parent, index)


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a config file's value fits a TrainConfig field's annotation ("float | None",
    "list[str] | str | None", ...), before validate() compares it with numbers."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        if isinstance(value, bool):
            if part == "bool":
                return True
            continue
        if part == "int" and isinstance(value, int):
            return True
        if part == "float" and isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            return True
        if (
            (part == "str" and isinstance(value, str))
            or (part.startswith("list") and isinstance(value, list))
            or (part.startswith("dict") and isinstance(value, dict))
        ):
            return True
    return False


def attention_kernels() -> list[str]:
    """The attention implementations transformers knows ("eager" plus its registered kernels)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]


def _looks_like_regex(text: str) -> bool:
    return any(c in text for c in "*()[]|\\^$+?")


def _need(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise TrainConfigError(f"--{name.replace('_', '-')}={value!r} is invalid: expected {expected}")
