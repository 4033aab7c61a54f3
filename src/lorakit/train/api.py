"""The main job from Python: train an adapter on a data set, then evaluate, predict, generate.

    from lorakit.train import TrainConfig, train
    result = train(TrainConfig(model="minilm", task="classification", data="train.jsonl",
                               eval_data="dev.jsonl", output="runs/sst2"))

An output directory is a loadable adapter directory (PEFT format, the best adapter by the
eval metric, else the last) plus `lorakit_task.json` (task, labels, base model), and
`checkpoints/` and `logs/` subfolders.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .. import lora, methods
from .._fs import remove_stale_temps
from ..adapter_dir import read_task_info, write_task_info
from ..models import checkpoint_reader, gguf_source, head_module_names, load_model, load_tokenizer, model_architectures
from ..quantize import check_scheme, dequantize_base, quantize_base
from . import preflight
from .config import TrainConfig
from .data import DataError, read_records
from .distributed import init_distributed
from .fanout import in_lockstep
from .state import BaseCallback
from .tasks import (
    Task,
    build_label_map,
    make_task,
    resolve_fields,
    task_class,
    task_for_architectures,
    task_of,
    to_examples,
)
from .trainer import Trainer, TrainResult

LOGS = "logs"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def read_examples(path: str, config: TrainConfig, limit: int | None, what: str) -> list[dict]:
    """Records from a file or dataset, turned into the task's examples (optionally a
    seeded random subset of `limit`)."""
    records = read_records(path)
    fields = resolve_fields(
        records,
        config.task,
        text_field=config.text_field,
        pair_field=config.pair_field,
        label_field=config.label_field,
        source=f"{what} {path}",
    )
    examples = to_examples(records, fields, source=f"{what} {path}")
    if not examples:
        raise DataError(f"{what} {path} is empty")
    if limit and limit < len(examples):
        examples = random.Random(0).sample(examples, limit)
    return examples


FROZEN_BASE_METHODS = ("lora", "adapter-h", "adapter-l", "prefix-embed", "prefix-layer")


def load_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype the base loads in. --bf16 with a frozen base: bf16 straight away (what
    `hold_frozen_in_bf16` would cast it to), so a checkpoint stored in bf16 maps lazily and the
    load never holds an fp32 copy (TinyLlama-1.1B: peak RSS 6.7 -> 3.x GB), and a base to be
    quantised is read from the file one weight at a time. Methods that train base weights load
    in fp32: their master weights must not start rounded."""
    return torch.bfloat16 if config.bf16 and config.method in FROZEN_BASE_METHODS else torch.float32


def build_model(config: TrainConfig, labels: Sequence[str]) -> tuple[nn.Module, Any, list[str]]:
    """Tokenizer, pretrained model with the task's head, and the names of new head modules."""
    tokenizer = load_tokenizer(config.model)
    loaded = load_model(config.model, task_class(config.task).auto_class, label_names=list(labels) or None,
                        dtype=load_dtype(config))  # fmt: skip
    attention = config.attention or default_attention(config)
    if attention:
        loaded.model.set_attn_implementation(attention)
    return loaded.model, tokenizer, loaded.new_modules


def add_tokens(model: nn.Module, tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` to the tokenizer as special tokens and grow the model's embedding table (and an
    untied output head) to fit; returns their ids."""
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # new rows: the mean of the old ones, as transformers does
    return tokenizer.convert_tokens_to_ids(list(tokens))


def training_device(config: TrainConfig) -> torch.device:
    """--device, else this process's GPU (LOCAL_RANK under torchrun) when CUDA is there, else the CPU."""
    if config.device:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise preflight.TrainConfigError(
                f"--device={config.device!r} is invalid: this machine has no CUDA GPU "
                "(or this torch build has no CUDA); use --device=cpu"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def default_attention(config: TrainConfig) -> str | None:
    """Causal LMs training in bf16 on CPU: eager attention (plain matmuls and a softmax), whose
    forward + backward beat SDPA's CPU kernel there (+15-30% tokens/s on SmolLM2,
    benchmarks/results/e2e_ablations.md). Otherwise the model's own choice."""
    on_cpu = training_device(config).type == "cpu"
    return "eager" if config.bf16 and on_cpu and task_class(config.task).can_pack else None


def train(config: TrainConfig, callbacks: Sequence[BaseCallback] | None = None) -> TrainResult:
    """Fine-tune `config.model` with LoRA on `config.data`; see the module docstring."""
    # Everything is checked before the first step (docs/validation.md): the options alone in
    # TrainConfig.validate, then the output dir, the data's fields, the model, the disk.
    dist = init_distributed(config.distributed)
    output = Path(config.output)
    if dist.is_main:
        preflight.check_output_dir(config)
    device = training_device(config)  # a --device this machine lacks fails here, not after loading
    seed_everything(config.seed)
    train_examples = read_examples(config.data, config, config.max_train_examples, "training data")
    eval_examples = (
        read_examples(config.eval_data, config, config.max_eval_examples, "eval data") if config.eval_data else []
    )
    labels = (
        build_label_map(train_examples, eval_examples, eval_source=f"eval data {config.eval_data}")
        if task_class(config.task).labelled
        else []
    )
    model, tokenizer, new_modules = build_model(config, labels)
    token_rows = None
    if config.add_tokens:  # the new rows train (and are saved) alone, not the whole table
        token_rows = lora.new_token_rows(model, add_tokens(model, tokenizer, config.add_tokens))
    preflight.check_lora_targets(config, model, new_modules)
    if config.quantize:  # before the adapter wraps the layers; new heads train in full, unquantised
        dtype = torch.bfloat16 if config.bf16 else torch.float32
        quantize_loaded(model, config.model, config.quantize, dtype, keep=new_modules)
    seed_everything(config.seed)  # adapter init does not depend on how loading used the RNG
    model = methods.apply_method(model, config, new_modules, token_rows)
    for adapter in lora.lora_configs(model).values():  # PEFT's AutoPeftModelFor..., vLLM pick the class by it
        adapter.task_type = task_class(config.task).peft_task_type
    model.to(device)
    task = make_task(config.task, tokenizer, config.max_length, labels, config.prompt_template)
    if dist.is_main:
        preflight.check_disk_space(config, model)
        for directory in (output, output / LOGS):  # temp files a killed run left behind
            remove_stale_temps(directory)
        write_task_info(output, task=config.task, labels=list(labels), model=config.model,
                        max_length=config.max_length, text_field=config.text_field,
                        pair_field=config.pair_field, label_field=config.label_field,
                        quantize=config.quantize, bf16=config.bf16, added_tokens=config.add_tokens,
                        prompt_template=config.prompt_template)  # fmt: skip
        if config.add_tokens:  # the vocabulary the adapter was trained with, beside it
            tokenizer.save_pretrained(output)
    if callbacks is None:
        from .callbacks import default_callbacks

        callbacks = default_callbacks(output / LOGS)
    count = lora.count_parameters(model)
    paper = methods.method_parameter_count(model)
    info = {
        "model": config.model,
        "task": config.task,
        "method": config.method,
        "trainable_params": count.trainable,
        "total_params": count.total,
        "trainable_percent": count.trainable_percent,
        # the LoRA paper's convention: the task head is not counted
        "trainable_params_paper": paper["paper_count"],
        "trainable_params_head": paper["head"],
    }
    trainer = Trainer(
        model,
        task,
        train_examples,
        eval_examples,
        config,
        save_adapter=lambda m, path, write: methods.save_method(m, path, write=write),
        callbacks=callbacks,
        info=info,
        dist=dist,
    )
    return trainer.train()


# -- using a trained adapter -----------------------------------------------------------------
@dataclass
class Trained:
    """A base model with an adapter loaded, ready for evaluate / predict / generate."""

    model: nn.Module
    tokenizer: Any
    task: Task
    info: dict[str, Any]


def load_base(model_name: str, task: str, labels: Sequence[str] = (), *, quantize: str | None = None,
              bf16: bool = False) -> nn.Module:  # fmt: skip
    """The frozen base for inference with `task`'s head: held in bf16 if asked, its linear
    layers quantised with `quantize` (nf4 | int8 | gguf) as a QLoRA run held them (bit for bit: the
    quantisation is deterministic), heads the checkpoint lacks left unquantised."""
    if quantize:
        check_scheme(quantize)  # an unknown scheme or missing backend, before anything loads
    dtype = torch.bfloat16 if bf16 else torch.float32
    loaded = load_model(model_name, task_class(task).auto_class, label_names=list(labels) or None, dtype=dtype)
    if quantize:
        quantize_loaded(loaded.model, model_name, quantize, dtype, keep=loaded.new_modules)
    return loaded.model


def quantize_loaded(model: nn.Module, model_name: str, scheme: str, dtype: torch.dtype, keep: Sequence[str]) -> None:
    """Quantise the base just loaded from `model_name` in place, reading its weights from where it
    came from: the safetensors files (nf4/int8, one weight at a time) or its GGUF file (gguf)."""
    quantize_base(model, scheme, compute_dtype=dtype, keep=keep, reader=checkpoint_reader(model_name),
                  gguf_file=gguf_source(model_name))  # fmt: skip


def load_trained(
    model: str | None,
    adapter_dirs: str | Path | Sequence[str | Path],
    task: str | None = None,
    max_length: int | None = None,
    *,
    quantize: str | None = None,
    bf16: bool | None = None,
) -> Trained:
    """Load the base model once and every adapter in `adapter_dirs` (named by their folder),
    the first one active. The base is quantised (`quantize`: nf4 | int8 | none) and held in
    bf16 as given, else as the first adapter's training run held it."""
    dirs = [Path(adapter_dirs)] if isinstance(adapter_dirs, (str, Path)) else [Path(d) for d in adapter_dirs]
    # a llama.cpp LoRA file carries no task or base: a causal LM, on the --model given
    info = {"task": "causal-lm", "labels": []} if lora.is_gguf_adapter(dirs[0]) else read_task_info(dirs[0])
    model_name = model or info.get("model")
    if not model_name:
        raise ValueError(f"no base model recorded in {dirs[0]}; pass --model")
    info["task"] = task or task_of(info) or _task_of_base(model_name, dirs[0], info)
    labels = info.get("labels") or []
    quantize = info.get("quantize") if quantize is None else None if quantize == "none" else quantize
    bf16 = bool(info.get("bf16") and quantize) if bf16 is None else bf16
    if quantize and any(methods.is_method_dir(d) for d in dirs):
        raise ValueError(f"--quantize={quantize} holds only a frozen base for LoRA adapters; {dirs[0]} holds a "
                         "method's trained weights: load it with --quantize none")  # fmt: skip
    _check_same_template(dirs, info.get("prompt_template"))
    base = load_base(model_name, info["task"], labels, quantize=quantize, bf16=bf16)
    info["quantize"] = quantize
    tokenizer = load_tokenizer(model_name)
    if info.get("added_tokens"):  # trained with new tokens: their tokenizer is beside the adapter
        tokenizer = load_tokenizer(str(dirs[0]))
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter holds the new rows
    for i, d in enumerate(dirs):
        if methods.is_method_dir(d):  # full/top2/bitfit/adapter/prefix: its trained tensors onto the base
            if len(dirs) > 1:
                raise ValueError(
                    f"{d} holds a {methods.read_method_config(d)['method']} model; only LoRA adapters "
                    "load several at once"
                )
            base = methods.load_method(base, d)
        else:
            lora.load_adapter(base, d, adapter_name="default" if len(dirs) == 1 else _adapter_name(d, i))
    base.eval()
    # the prompt template the adapter trained with wraps every prompt it is given here too
    task = make_task(info["task"], tokenizer, max_length or info.get("max_length", 256), labels,
                     info.get("prompt_template"))  # fmt: skip
    return Trained(base, tokenizer, task, info)


def _check_same_template(dirs: Sequence[Path], template: str | None) -> None:
    """Adapters loaded together read the same prompts: one trained with another prompt template
    than the first would be scored on text it never saw."""
    for d in dirs[1:]:
        other = None if lora.is_gguf_adapter(d) else read_task_info(d).get("prompt_template")
        if other != template:
            raise ValueError(
                f"{d} was trained with prompt template {other!r}, {dirs[0]} with {template!r}: adapters loaded "
                "together share one; evaluate them one at a time"
            )


def _task_of_base(model_name: str, adapter_dir: Path, info: dict) -> str:
    """An adapter saved without a task (PEFT's task_type left out): the task its base model's
    architecture implies (config.json `architectures`), if exactly one does."""
    architectures = model_architectures(model_name)
    task = task_for_architectures(architectures)
    if task is None:
        known = f"PEFT task_type {info['task_type']!r}" if info.get("task_type") else "no task_type"
        raise ValueError(
            f"{adapter_dir} has {known}, and the base model's architecture "
            f"{architectures or '(none recorded)'} does not say which task it is; pass --task"
        )
    return task


def _adapter_name(path: Path, index: int) -> str:
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in path.resolve().name)
    return name or f"adapter{index}"


def merge_trained(trained: Trained, probe_rows: int = 4, probe_length: int = 32) -> tuple[nn.Module, dict]:
    """The adapter merged into its base: a plain model, and a report. An adapter trained on a
    quantised base (`trained.info["quantize"]`) merges into the dequantised weights it was
    trained against (ΔW added once, in the base's dtype), and the report says how far that
    model, and the same model quantised again, land from the unmerged adapter on the
    quantised base: max |logits difference| / max |logits| on `probe_rows` random token rows."""
    model, scheme = trained.model, trained.info.get("quantize")
    if not scheme:
        return lora.merge_and_unload(model), {}
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (probe_rows, probe_length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)

    def logits(m: nn.Module) -> Tensor:
        with torch.no_grad():
            return m(input_ids=ids).logits.float()

    unmerged = logits(model)
    dtype = torch.bfloat16 if trained.info.get("bf16") else torch.float32
    dequantize_base(model, dtype)
    plain = lora.merge_and_unload(model)  # refuses a NaN/inf result
    scale = unmerged.abs().max().clamp_min(1e-12)
    report = {"merged_drift": ((logits(plain) - unmerged).abs().max() / scale).item()}
    if scheme == "gguf":  # GGUF blocks are re-made by llama.cpp's own quantize tool, not here
        return plain, report
    requantised = copy.deepcopy(plain)
    quantize_base(requantised, scheme, compute_dtype=dtype, keep=head_module_names(requantised))
    report["requantised_drift"] = ((logits(requantised) - unmerged).abs().max() / scale).item()
    return plain, report


def evaluate(
    trained: Trained,
    data: str,
    generate: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    fields: dict[str, str | None] | None = None,
) -> dict[str, float]:
    """Score the loaded adapter on a data file (metrics in percent; loss/perplexity raw)."""
    examples = _eval_examples(trained, data, fields)
    with torch.no_grad():
        return trained.task.evaluate(
            trained.model, examples, batch_size=batch_size, generate=generate, max_new_tokens=max_new_tokens
        )


def evaluate_adapters(
    trained: Trained,
    adapters: Sequence[str | None],
    data: str,
    generate: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    fields: dict[str, str | None] | None = None,
) -> list[dict[str, float]]:
    """Score each of `adapters` (adapter names loaded on `trained.model`; None: the base) on the
    same data in one pass: every batch runs once, its rows repeated per adapter in a mixed batch
    (fanout.py). Generation metrics (`generate` > 0) are taken adapter by adapter."""
    examples = _eval_examples(trained, data, fields)
    scores = in_lockstep(trained.model, adapters, lambda view: trained.task.evaluate(view, examples, batch_size))
    if generate:
        for name, row in zip(adapters, scores):
            with only(trained.model, name), torch.no_grad():
                row.update(trained.task.evaluate(trained.model, examples, batch_size=batch_size, generate=generate,
                                                 max_new_tokens=max_new_tokens))  # fmt: skip
    return scores


@contextlib.contextmanager
def only(model: nn.Module, name: str | None):
    """Inside the block, `model` runs adapter `name` alone (None: the base, adapters disabled);
    the adapters active before are active again after."""
    if name is None:
        with lora.disable_adapters(model):
            yield model
        return
    before = lora.active_adapters(model)
    lora.set_adapter(model, name)
    try:
        yield model
    finally:
        if before:
            lora.set_adapter(model, before)


def _eval_examples(trained: Trained, data: str, fields: dict[str, str | None] | None) -> list[dict]:
    """The examples of `data`, refusing labels the adapter was not trained on."""
    examples = read_examples(data, _config_for(trained, data, fields), None, "eval data")
    if trained.task.labels:
        unseen = {e.get("label") for e in examples if "label" in e} - set(trained.task.labels)
        if unseen:
            raise DataError(
                f"eval data {data} has label(s) {sorted(unseen)} the adapter was not trained on "
                f"(it knows {trained.task.labels})"
            )
    return examples


def _config_for(trained: Trained, data: str, fields: dict[str, str | None] | None) -> TrainConfig:
    fields = {k: v for k, v in (fields or {}).items() if v is not None}
    known = {k: trained.info.get(k) for k in ("text_field", "pair_field", "label_field")}
    return TrainConfig(model="-", task=trained.task.name, data=data, **{**known, **fields})
