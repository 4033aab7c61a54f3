"""What an adapter directory holds, without loading any model (`lorakit inspect`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .adapter_dir import trained_on
from .lora.config import CONFIG_NAME, LoraConfig
from .lora.io import PREFIX, WEIGHTS_NAME, read_adapter_weights
from .lora.principal import is_weight_init
from .lora.tokens import SAVED_SUFFIX

# Every key PEFT writes for a LoRA adapter ends in one of these, or is a saved module's own
# parameter (modules_to_save) or a bias.
_PEFT_LORA_KEY = re.compile(
    r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)


def describe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return _describe_gguf(path)
    config = LoraConfig.from_pretrained(path)
    state = read_adapter_weights(path)
    lora_keys = [k for k in state if _PEFT_LORA_KEY.search(k)]
    modules = sorted({_PEFT_LORA_KEY.sub("", k)[len(PREFIX) :] for k in lora_keys})
    # an adapted parameter's A stacks one rank-r block per expert: its rank is the config's
    holders = tuple("." + t.rsplit(".", 1)[0] for t in config.target_parameters or [])
    on_parameter = [k for k in lora_keys if _PEFT_LORA_KEY.sub("", k).replace(".base_layer", "").endswith(holders)]
    ranks = {state[k].shape[0] for k in lora_keys if "_A" in k and k not in on_parameter}
    ranks = sorted(ranks | ({config.r} if on_parameter and holders else set()))
    task = path / "lorakit_task.json"
    info: dict[str, Any] = {
        "base model": config.base_model_name_or_path or "(not recorded)",
        "task": json.loads(task.read_text()).get("task") if task.is_file() else (config.task_type or "(not recorded)"),
        "targets": config.target_modules
        if isinstance(config.target_modules, str)
        else ", ".join([*(config.target_modules or []), *(config.target_parameters or [])]),
        "adapted modules": len(modules),
        "rank": ", ".join(map(str, ranks))
        + (f" (pattern: {len(config.rank_pattern)} modules)" if config.rank_pattern else ""),
        "alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "variant": "DoRA (a trained magnitude per output row)" if config.use_dora else "LoRA",
        "init": f"{config.init_lora_weights}: for the residual base (loading redoes the init on the base)"
        if is_weight_init(config.init_lora_weights)
        else "plain (loads on the untouched base)",
        "LoRA parameters": f"{sum(state[k].numel() for k in lora_keys):,}",
        "other saved parameters": f"{sum(v.numel() for k, v in state.items() if k not in set(lora_keys)):,}"
        + (f" (modules_to_save: {', '.join(config.modules_to_save)})" if config.modules_to_save else ""),
        "new token rows": _token_rows(config, state),
        "dtype": ", ".join(sorted({str(v.dtype).replace("torch.", "") for v in state.values()})),
        "size on disk": _size(sum(f.stat().st_size for f in path.iterdir() if f.is_file())),
        "PEFT compatible": _peft_compatible(path, state),
        "vLLM": _vllm(config, state, ranks),
        "llama.cpp (lorakit export --format gguf)": _llama_cpp(path, config, state),
    }
    return info


def _describe_gguf(path: Path) -> dict[str, Any]:
    """A llama.cpp LoRA GGUF file: what it is for and holds, read without a model."""
    import gguf

    from .lora.gguf_adapter import gguf_field

    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        return gguf_field(reader, key)

    a_tensors = [t for t in reader.tensors if t.name.endswith(".lora_a")]
    return {
        "format": "llama.cpp LoRA adapter (GGUF)"
        if field("adapter.type") == "lora"
        else f"not a LoRA adapter (general.type={field('general.type')!r})",  # fmt: skip
        "architecture": field("general.architecture"),
        "alpha": field("adapter.lora.alpha"),
        "adapted tensors": len(a_tensors),
        "rank": ", ".join(map(str, sorted({int(t.shape[-1]) for t in a_tensors}))),
        "tensor types": ", ".join(sorted({t.tensor_type.name for t in reader.tensors})),
        "size on disk": _size(path.stat().st_size),
        "loads in": "llama.cpp, Ollama (ADAPTER); lorakit.load_adapter(model, path) on its base",
    }


def _vllm(config: LoraConfig, state: dict, ranks: list[int]) -> str:
    """Whether vLLM's LoRA loader takes the adapter, and if not the rule it breaks."""
    if config.modules_to_save:
        return f"no: vLLM does not load modules_to_save ({', '.join(config.modules_to_save)}); merge the adapter"
    if is_weight_init(config.init_lora_weights):
        return (f"no: saved as trained for the residual base of its {config.init_lora_weights} init; save it as plain "
                "LoRA (lorakit.save_adapter(model, path), the default)")  # fmt: skip
    if config.target_parameters:
        return ("not checked: vLLM's LoRA on fused MoE experts (target_parameters) depends on the model and vLLM "
                "version; merging the adapter always works")  # fmt: skip
    if config.trainable_token_indices:
        return "no: vLLM does not load trained token rows (trainable_token_indices); merge the adapter"
    if config.use_dora:
        return "no: vLLM does not run DoRA adapters; merge the adapter (lorakit merge) and serve the merged model"
    if any(k.endswith(".bias") for k in state):
        return "no: vLLM loads no adapter bias terms; train without --bias or merge the adapter"
    rank = max(ranks, default=0)
    return f"yes (start vLLM with --max-lora-rank >= {rank}; its default is 16)" if rank > 16 else "yes"


def _token_rows(config: LoraConfig, state: dict) -> str:
    keys = [k for k in state if k.endswith(SAVED_SUFFIX)]
    if not keys:
        return "none"
    modules = ", ".join(k[len(PREFIX) : -len(SAVED_SUFFIX) - 1] for k in keys)
    return f"{state[keys[0]].shape[0]} tokens ({modules}): only their rows are saved"


def _llama_cpp(path: Path, config: LoraConfig, state: dict) -> str:
    """Whether `lorakit export --format gguf` can write the adapter for llama.cpp, or why not."""
    from .lora.gguf_adapter import GGUFAdapterError, exportable_pairs, gguf_tensors

    try:
        exportable_pairs(config, state)
    except GGUFAdapterError as e:
        return f"no: {e}"
    base = trained_on(path) or config.base_model_name_or_path
    try:
        from .export import base_config

        gguf_tensors(config, state, base_config(base))  # the architecture's names, a tied embedding
    except GGUFAdapterError as e:
        return f"no: {e}"
    except (OSError, ValueError):  # the base is not on this machine: its architecture cannot be checked here
        return f"yes, if llama.cpp knows the base's architecture ({base or 'base not recorded'} not found here)"
    return "yes"


def _peft_compatible(path: Path, state: dict) -> str:
    problems = [k for k in state if not k.startswith(PREFIX)]
    if problems:
        return f"no: keys without PEFT's '{PREFIX}' prefix, e.g. {problems[0]}"
    if not (path / WEIGHTS_NAME).is_file():
        return f"no: PEFT expects {WEIGHTS_NAME}"
    try:
        import peft
    except ImportError:
        return "yes (PEFT key names and config; PEFT itself not installed to double-check)"
    try:
        peft.LoraConfig.from_pretrained(str(path))
    except Exception as e:  # whatever PEFT objects to is the answer
        return f"no: PEFT rejects {CONFIG_NAME}: {e}"
    return f"yes (checked with PEFT {peft.__version__})"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
