"""`lorakit export`: an adapter directory in the form a deployment runtime loads.

- gguf: llama.cpp's LoRA adapter file (lora/gguf_adapter.py), for llama.cpp, LM Studio and
  anything built on llama.cpp.
- ollama: that file plus a Modelfile (`FROM` the base's GGUF, `ADAPTER` the adapter's), ready
  for `ollama create`.
"""

from __future__ import annotations

from pathlib import Path

from ._fs import atomic_write_text
from .adapter_dir import trained_on
from .lora.config import LoraConfig
from .lora.gguf_adapter import GGUFAdapterError, export_gguf
from .lora.io import read_adapter_weights
from .models import gguf_source, resolve_model

FORMATS = ("gguf", "ollama")


def export_adapter(adapter: str | Path, fmt: str, output: str | Path, *, outtype: str = "f32",
                   model: str | None = None, base_gguf: str | Path | None = None) -> list[Path]:  # fmt: skip
    """Write `adapter` (a PEFT/lorakit adapter directory) as `fmt` at `output` (gguf: the file;
    ollama: a directory); returns the files written. The base (`model`, else the one the
    adapter records) gives the architecture and, for Ollama, its GGUF file (`base_gguf`)."""
    if fmt not in FORMATS:
        raise GGUFAdapterError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    config = LoraConfig.from_pretrained(adapter)
    base = model or trained_on(adapter) or config.base_model_name_or_path
    if not base:
        raise GGUFAdapterError(f"{adapter} does not record its base model; pass --model")
    if fmt == "gguf":
        return [export_gguf(config, read_adapter_weights(adapter), base_config(base), output, outtype)]
    base_file = Path(base_gguf) if base_gguf else gguf_source(base)
    if base_file is None:
        raise GGUFAdapterError(f"Ollama runs the base as a GGUF file, and {base} is not one: convert it with "
                               "llama.cpp's convert_hf_to_gguf.py and pass its path as --base-gguf")  # fmt: skip
    directory = Path(output)
    gguf_file = export_gguf(config, read_adapter_weights(adapter), base_config(base), directory / "adapter.gguf",
                            outtype)  # fmt: skip
    modelfile = directory / "Modelfile"
    atomic_write_text(modelfile, f"FROM {base_file.resolve()}\nADAPTER ./{gguf_file.name}\n")
    return [gguf_file, modelfile]


def base_config(name_or_path: str) -> dict:
    """The transformers config of a base model (alias, directory, GGUF or hub id), as a dict."""
    from transformers import AutoConfig

    resolved = resolve_model(name_or_path)
    return AutoConfig.from_pretrained(resolved.path, **resolved.kwargs).to_dict()
