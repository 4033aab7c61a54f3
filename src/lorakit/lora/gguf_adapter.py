"""llama.cpp's LoRA adapter file (GGUF), written from PEFT's format and read back into it.

The file (what llama.cpp's `convert_lora_to_gguf.py` writes, and `llama_cpp.Llama(lora_path=...)`
/ Ollama's `ADAPTER` read): `general.type = adapter`, `general.architecture` = the base's,
`adapter.type = lora`, `adapter.lora.alpha`; per adapted weight `<gguf name>.weight.lora_a`
([r, in]) and `.lora_b` ([out, r]), under llama.cpp's names for the architecture (the `gguf`
package's tensor name map). llama.cpp applies every pair with alpha / r, so what PEFT scales
otherwise (rsLoRA's alpha / sqrt(r), `alpha_pattern`) is folded into B; ranks may differ per
tensor (`rank_pattern`) as they are. For LLaMA-style architectures (ROTARY_PERMUTED) llama.cpp's
converter permutes the rows of q and k for its rotary layout, so B's rows of those two are permuted
the same way.
An embedding LoRA (PEFT: A [r, vocab], B [dim, r]) goes under `token_embd.weight` with A stored
transposed, [vocab, r]: llama.cpp gathers A's rows for the prompt's tokens (llm_build_inp_embd).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .config import LoraConfig
from .peft_keys import PAIRS, PREFIX, lora_modules, module_scaling
from .principal import is_weight_init

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# transformers model_type -> llama.cpp architecture, for the bases whose adapter files lorakit writes
# as llama.cpp's own convert_lora_to_gguf.py does (each checked against it: tests/lora/test_gguf_adapter.py).
# llama.cpp's converter rewrites other architectures' weights (fused qkv rows reordered, experts
# stacked) in ways lorakit does not reproduce, so those are refused rather than written wrong.
GGUF_ARCHITECTURE = {
    "llama": "llama", "mistral": "llama", "smollm3": "smollm3", "granite": "granite", "olmo": "olmo",
    "olmo2": "olmo2", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
    "gemma3_text": "gemma3", "phi": "phi2", "phi3": "phi3", "starcoder2": "starcoder2", "stablelm": "stablelm",
    "cohere": "command-r",
}  # fmt: skip
# llama.cpp architectures whose converter permutes the q/k rows (LlamaModel.permute) for its rotary layout
ROTARY_PERMUTED = ("llama", "smollm3", "granite", "olmo")
TOKEN_EMBD = "token_embd"  # llama.cpp's name for the input embedding table


class GGUFAdapterError(ValueError):
    """An adapter llama.cpp cannot run as it is, or a file that is not a llama.cpp LoRA adapter."""


def gguf_architecture(base_config: dict[str, Any]):
    """(llama.cpp's architecture name, the gguf package's MODEL_ARCH) of a transformers config."""
    import gguf

    model_type = base_config.get("model_type", "")
    name = GGUF_ARCHITECTURE.get(model_type)
    if name is None:
        raise GGUFAdapterError(f"lorakit exports GGUF adapters for bases of model_type {', '.join(GGUF_ARCHITECTURE)} "
                               f"(each checked against llama.cpp's converter), and this base is {model_type!r}: use "
                               "the PEFT directory, or llama.cpp's convert_lora_to_gguf.py where llama.cpp runs "
                               "that architecture")  # fmt: skip
    arch = {value: key for key, value in gguf.MODEL_ARCH_NAMES.items()}[name]
    return name, arch


def export_gguf(config: LoraConfig, state: dict[str, torch.Tensor], base_config: dict[str, Any],
                output: str | Path, outtype: str = "f32") -> Path:  # fmt: skip
    """Write the adapter (`config` and `state`, PEFT's format) as a llama.cpp LoRA GGUF file for a
    base with transformers config `base_config`, atomically. Raises GGUFAdapterError, before
    writing anything, for what llama.cpp would refuse or run differently."""
    import gguf

    if outtype not in OUTTYPES:
        raise GGUFAdapterError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    name = gguf_architecture(base_config)[0]
    tensors = gguf_tensors(config, state, base_config)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.lora_alpha))
    for key, tensor in tensors.items():
        data, kind = _encode(tensor, outtype)
        writer.add_tensor(key, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(output)
    return output


def gguf_tensors(config: LoraConfig, state: dict[str, torch.Tensor], base_config: dict[str, Any]) -> dict:
    """{llama.cpp tensor name: fp32 tensor} of the adapter for a base with transformers config
    `base_config`; GGUFAdapterError for what llama.cpp would refuse or run differently."""
    import gguf

    name, arch = gguf_architecture(base_config)
    names = gguf.get_tensor_name_map(arch, base_config["num_hidden_layers"])
    tensors = {}
    for path, (A, B) in exportable_pairs(config, state).items():  # A: [r, in], B: [out, r]
        base = names.get_name(path)
        if base is None:
            raise GGUFAdapterError(f"the adapted module {path} has no tensor in llama.cpp's {name} architecture; "
                                   "leave it out of target_modules to export")  # fmt: skip
        r = A.shape[0]
        B = B * (module_scaling(config, path, r) * r / config.lora_alpha)  # llama.cpp scales by alpha / r
        B = _permute_rows(B, name, base, base_config)
        if base == TOKEN_EMBD:
            _check_untied(path, base_config)
            A = A.T  # [vocab, r]: llama.cpp gathers the prompt tokens' rows
        tensors[f"{base}.weight.lora_a"], tensors[f"{base}.weight.lora_b"] = A, B
    return tensors


def _check_untied(path: str, base_config: dict[str, Any]) -> None:
    """llama.cpp finds a LoRA by its tensor's name, and a tied output head is the embedding table
    under the same name: it would apply the embedding's pair to the head's matmul as well, where
    the shapes do not fit (PEFT adapts the lookup only)."""
    if base_config.get("tie_word_embeddings"):
        raise GGUFAdapterError(f"{path} is an embedding LoRA on a base whose output head shares the embedding "
                               "table (tie_word_embeddings); llama.cpp would apply it to the head as well and "
                               "fail. Leave the embedding out of target_modules, or merge the adapter "
                               "(lorakit merge) and convert the merged model")  # fmt: skip


def exportable_pairs(config: LoraConfig, state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """{module path: (A, B) in fp32} of a plain-LoRA adapter on linear and embedding layers, or the
    reason not."""
    if is_weight_init(config.init_lora_weights):
        raise GGUFAdapterError(f"this {config.init_lora_weights} adapter was saved as trained, for the residual "
                               "base its init leaves; save it as plain LoRA (lorakit.save_adapter(model, path), the "
                               "default) and export that")  # fmt: skip
    if config.trainable_token_indices:
        raise GGUFAdapterError("the adapter trains embedding rows of new tokens, which llama.cpp's LoRA files cannot "
                               "hold (the base's vocabulary would change too); merge it (lorakit merge) and convert "
                               "the merged model with its tokenizer")  # fmt: skip
    if config.target_parameters:
        raise GGUFAdapterError(f"the adapter adapts parameters ({', '.join(config.target_parameters)}: fused MoE "
                               "experts), which lorakit does not export to llama.cpp's LoRA format yet; merge it "
                               "(lorakit merge) and convert the merged model")  # fmt: skip
    if config.use_dora:
        raise GGUFAdapterError("a DoRA adapter rescales each weight column by a learned magnitude, which llama.cpp's "
                               "LoRA files cannot hold; merge it instead (lorakit merge)")  # fmt: skip
    modules = lora_modules(state)
    paired = {key for pair in modules.values() for key in pair}
    for key in state:
        if key not in paired:
            module = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            why = "which llama.cpp's LoRA files cannot hold; merge the adapter instead"
            raise GGUFAdapterError(
                f"{module} is trained as full weights (modules_to_save, a bias or a new task head), {why}"
            )
    pairs = {}
    for path, (a_key, b_key) in modules.items():
        A, B = state[a_key].float(), state[b_key].float()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            why = "not a linear layer's LoRA pair (a convolution, or a sliced fused projection): not for GGUF"
            raise GGUFAdapterError(f"{path}: A {tuple(A.shape)} and B {tuple(B.shape)} are {why}")
        pairs[path] = (A, B)
    if not pairs:
        raise GGUFAdapterError("the adapter holds no LoRA pair to export")
    return pairs


def _permute_rows(B: torch.Tensor, arch: str, base: str, base_config: dict, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's converter's q/k row permutation (each head's rotary halves interleaved) on B's
    rows [out, r], or (`inverse`) its undoing; other tensors and architectures as they are."""
    if arch not in ROTARY_PERMUTED or not base.endswith((".attn_q", ".attn_k")):
        return B
    heads = base_config["num_attention_heads"]
    if base.endswith(".attn_k"):
        heads = base_config.get("num_key_value_heads") or heads
    half = B.shape[0] // heads // 2
    split = (heads, half, 2, B.shape[1]) if inverse else (heads, 2, half, B.shape[1])
    return B.reshape(split).transpose(1, 2).reshape(B.shape)


def _encode(tensor: torch.Tensor, outtype: str):
    """(array, gguf type) for `tensor` [rows, cols] in `outtype`. q8_0 needs rows of 32-value
    blocks; a tensor whose rows are not (B's, of rank r) goes f16, as llama.cpp's converter does."""
    import gguf

    data = tensor.detach().float().contiguous().numpy()
    kinds = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}  # fmt: skip
    kind = kinds[outtype]
    if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        kind = gguf.GGMLQuantizationType.F16
    if kind == gguf.GGMLQuantizationType.F32:
        return data, kind
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), kind
    return gguf.quants.quantize(data, kind), kind


def is_gguf_adapter(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".gguf" and path.is_file()


def read_gguf_adapter(path: str | Path, model: nn.Module) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A llama.cpp LoRA GGUF file as PEFT's (config, state dict) for `model` (a transformers
    model of the file's architecture): tensors mapped to the model's module names, dequantised
    to fp32, q/k rows un-permuted, one rank per module, alpha as the file gives it."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {key: gguf_field(reader, key) for key in ("general.type", "general.architecture", "adapter.type",
                                                   "adapter.lora.alpha")}  # fmt: skip
    if fields["general.type"] != "adapter" or fields["adapter.type"] != "lora":
        raise GGUFAdapterError(f"{path} is not a llama.cpp LoRA adapter (general.type="
                               f"{fields['general.type']!r}, adapter.type={fields['adapter.type']!r}); a GGUF "
                               "model is loaded as --model")  # fmt: skip
    base_config = model.config.to_dict()
    arch_name, arch = gguf_architecture(base_config)
    if fields["general.architecture"] != arch_name:
        raise GGUFAdapterError(f"{path} was made for a {fields['general.architecture']} model; this "
                               f"{type(model).__name__} is {arch_name}")  # fmt: skip
    names = gguf.get_tensor_name_map(arch, base_config["num_hidden_layers"])
    modules = {names.get_name(path_): path_ for path_, _ in model.named_modules() if path_}
    modules.pop(None, None)
    state, ranks = {}, {}
    for tensor in reader.tensors:
        base, _, kind = tensor.name.removesuffix(".lora_a").removesuffix(".lora_b").rpartition(".weight")
        side = tensor.name.rsplit(".", 1)[-1]
        module = modules.get(base)
        if module is None or kind or side not in ("lora_a", "lora_b"):
            raise GGUFAdapterError(f"{path}: tensor {tensor.name} matches no module of this {type(model).__name__}")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        rows_cols = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        weight = torch.from_numpy(values.reshape(rows_cols).copy())
        a_key, b_key = (".lora_embedding_A", ".lora_embedding_B") if base == TOKEN_EMBD else PAIRS[0]
        if side == "lora_b":
            weight = _permute_rows(weight, arch_name, base, base_config, inverse=True)
            state[f"{PREFIX}{module}{b_key}"] = weight
        else:
            weight = weight.T.contiguous() if base == TOKEN_EMBD else weight  # stored [vocab, r]
            state[f"{PREFIX}{module}{a_key}"] = weight
            ranks[module] = weight.shape[0]
    if not ranks:
        raise GGUFAdapterError(f"{path} holds no LoRA tensors")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(r=r, lora_alpha=float(fields["adapter.lora.alpha"]), target_modules=sorted(ranks),
                        rank_pattern={m: k for m, k in ranks.items() if k != r},
                        base_model_name_or_path=base_config.get("_name_or_path"))  # fmt: skip
    return config, state


def gguf_field(reader, key: str):
    """A GGUF file's metadata value `key`, or None."""
    field = reader.get_field(key)
    return None if field is None else field.contents()
