"""llama.cpp's LoRA GGUF files: lorakit writes what llama.cpp's own converter writes for the
same PEFT adapter (names, shapes, values, metadata), reads such a file back equal to the
adapter it came from, and refuses what llama.cpp cannot run, naming the module and the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import lorakit
from lorakit.lora.gguf_adapter import GGUFAdapterError, export_gguf, read_gguf_adapter
from lorakit.lora.io import read_adapter_weights

gguf = pytest.importorskip("gguf")


SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=64)  # fmt: skip
ARCHITECTURES = {  # every base lorakit's GGUF export covers: transformers config, model class, extra config fields
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
    "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM, {"pad_token_id": 0}),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {}),
    "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, {}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16}),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16}),
    "phi": (tf.PhiConfig, tf.PhiForCausalLM, {}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0}),
    "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, {}),
    "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM, {}),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {}),
}


def tiny_llama(arch: str = "llama") -> tf.PreTrainedModel:
    torch.manual_seed(0)
    config_class, model_class, extra = ARCHITECTURES[arch]
    return model_class(config_class(**SHAPE, **extra)).eval()


def adapter_dir(tmp_path: Path, arch: str = "llama", **config) -> tuple[tf.PreTrainedModel, Path]:
    """A tiny model of `arch` with a random (non-zero) adapter saved in PEFT's format."""
    model = tiny_llama(arch)
    lorakit.inject(model, lorakit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **config}))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_(std=0.3)
            if isinstance(layer.base_layer, torch.nn.Embedding):  # its A starts at zero
                layer.lora_A["default"].normal_(std=0.3)
    lorakit.save_adapter(model, tmp_path / "peft")
    return model, tmp_path / "peft"


def export(tmp_path: Path, model, directory: Path, outtype: str = "f32") -> Path:
    config = lorakit.LoraConfig.from_pretrained(directory)
    return export_gguf(config, read_adapter_weights(directory), model.config.to_dict(), tmp_path / "a.gguf", outtype)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"v_proj": 8}, "alpha_pattern": {"down_proj": 3.0}},
        {"target_modules": ["embed_tokens", "q_proj", "v_proj"]},
    ],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "granite"])
def test_a_gguf_file_read_back_computes_what_the_adapter_computes(tmp_path, config, arch):
    """rsLoRA and the per-module patterns are folded into B (llama.cpp scales by alpha / r)."""
    model, directory = adapter_dir(tmp_path, arch, **config)
    path = export(tmp_path, model, directory)
    fresh = lorakit.load_adapter(tiny_llama(arch), path)
    ids = torch.tensor([[1, 5, 9, 33, 60, 2]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with lorakit.disable_adapters(model):
            assert not torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-3)


def test_the_file_holds_llama_cpps_layout(tmp_path):
    """The oracle written out: names, metadata, [r, in] / [out, r] and q/k rows permuted."""
    model, directory = adapter_dir(tmp_path)
    reader = gguf.GGUFReader(str(export(tmp_path, model, directory)))
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == 8.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks
    layer = model.model.layers[1].self_attn.k_proj
    a = tensors["blk.1.attn_k.weight.lora_a"].data
    b = tensors["blk.1.attn_k.weight.lora_b"].data
    np.testing.assert_array_equal(a, layer.lora_A["default"].detach().numpy())  # [4, 64]
    B = layer.lora_B["default"].detach().numpy()  # [32, 4]: 2 kv heads of 16 rows
    permuted = B.reshape(2, 2, 8, 4).swapaxes(1, 2).reshape(32, 4)  # llama.cpp's converter's permute
    np.testing.assert_array_equal(b, permuted)
    np.testing.assert_array_equal(tensors["blk.0.ffn_up.weight.lora_b"].data,
                                  model.model.layers[0].mlp.up_proj.lora_B["default"].detach().numpy())  # fmt: skip


def test_an_embedding_lora_is_stored_as_llama_cpp_gathers_it(tmp_path):
    """token_embd: A transposed to [vocab, r] (llama.cpp looks up the prompt tokens' rows), B [dim, r]."""
    model, directory = adapter_dir(tmp_path, target_modules=["embed_tokens"])
    tensors = {t.name: t for t in gguf.GGUFReader(str(export(tmp_path, model, directory))).tensors}
    assert sorted(tensors) == ["token_embd.weight.lora_a", "token_embd.weight.lora_b"]
    layer = model.model.embed_tokens
    A, B = layer.lora_A["default"].detach().numpy(), layer.lora_B["default"].detach().numpy()  # [4, 64], [64, 4]
    np.testing.assert_array_equal(tensors["token_embd.weight.lora_a"].data, A.T)
    np.testing.assert_array_equal(tensors["token_embd.weight.lora_b"].data, B)
    ids = torch.tensor([[3, 7, 7, 60]])  # the oracle written out: row `id` of the table moves by (B A)ᵀ[id] alpha/r
    with torch.no_grad():
        expected = model.model.embed_tokens.base_layer(ids) + torch.from_numpy((B @ A).T)[ids] * 8 / 4
        torch.testing.assert_close(model.model.embed_tokens(ids), expected)


def test_an_embedding_lora_on_a_tied_head_is_refused(tmp_path):
    """llama.cpp finds a LoRA by tensor name; a tied head is the table under the same name."""
    model, directory = adapter_dir(tmp_path, target_modules=["embed_tokens", "q_proj"])
    config, state = lorakit.LoraConfig.from_pretrained(directory), read_adapter_weights(directory)
    tied = {**model.config.to_dict(), "tie_word_embeddings": True}
    with pytest.raises(GGUFAdapterError, match="model.embed_tokens is an embedding LoRA on a base whose output head"):
        export_gguf(config, state, tied, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    from lorakit.inspect_adapter import describe  # inspect says so beforehand, from the base it records

    tiny_llama().save_pretrained(tmp_path / "untied")
    tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE, tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    for base, verdict in (("untied", "yes"), ("tied", "no: model.embed_tokens is an embedding LoRA on a base")):
        saved = json.loads((directory / "adapter_config.json").read_text())
        saved["base_model_name_or_path"] = str(tmp_path / base)
        (directory / "adapter_config.json").write_text(json.dumps(saved))
        assert describe(directory)["llama.cpp (lorakit export --format gguf)"].startswith(verdict), base


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_smaller_outtypes_round_the_tensors_only(tmp_path, outtype, tol):
    model, directory = adapter_dir(tmp_path)
    config, state = read_gguf_adapter(export(tmp_path, model, directory, outtype), tiny_llama())
    for key, value in read_adapter_weights(directory).items():
        assert (state[key] - value).abs().max() <= tol * value.abs().max(), key


def test_what_llama_cpp_cannot_run_is_refused_before_writing(tmp_path):
    model, directory = adapter_dir(tmp_path)
    config, state = lorakit.LoraConfig.from_pretrained(directory), read_adapter_weights(directory)
    base = model.config.to_dict()
    head = {**state, "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(64, 64)}
    with pytest.raises(GGUFAdapterError, match="lm_head.modules_to_save.default.weight is trained as full weights"):
        export_gguf(config, head, base, tmp_path / "x.gguf")
    for unchecked in ("mpnet", "gpt_neox"):  # llama.cpp has no mpnet; its converter reorders GPT-NeoX's qkv rows
        with pytest.raises(GGUFAdapterError, match=f"lorakit exports GGUF adapters for .* this base is '{unchecked}'"):
            export_gguf(config, state, {**base, "model_type": unchecked}, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_model_gguf_is_not_read_as_an_adapter(tmp_path):
    from ..gguf_files import tiny_llama_gguf

    with pytest.raises(lorakit.AdapterLoadError, match="not a llama.cpp LoRA adapter"):
        lorakit.load_adapter(tiny_llama(), tiny_llama_gguf(tmp_path, "Q8_0"))


# -- against llama.cpp's own converter -------------------------------------------------------
@pytest.mark.parametrize(
    "arch,targets",
    [(arch, "all-linear") for arch in ARCHITECTURES]
    + [(arch, ["embed_tokens", "k_proj", "down_proj"]) for arch in ("llama", "qwen2", "qwen3")],
)
def test_lorakit_writes_what_llama_cpps_converter_writes(tmp_path, llama_cpp_source, arch, targets):
    model, directory = adapter_dir(tmp_path, arch, target_modules=targets)
    base = tmp_path / "base"
    tiny_llama(arch).save_pretrained(base)
    theirs_path = tmp_path / "theirs.gguf"
    env = {**os.environ, "PYTHONPATH": f"{llama_cpp_source / 'gguf-py'}:{llama_cpp_source}"}
    run = subprocess.run([sys.executable, str(llama_cpp_source / "convert_lora_to_gguf.py"), "--base", str(base),
                          "--outfile", str(theirs_path), "--outtype", "f32", str(directory)],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = gguf.GGUFReader(str(export(tmp_path, model, directory))), gguf.GGUFReader(str(theirs_path))
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert ours.get_field(key).contents() == theirs.get_field(key).contents(), key
    mine = {t.name: t for t in ours.tensors}
    assert sorted(mine) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        assert list(mine[t.name].shape) == list(t.shape) and mine[t.name].tensor_type == t.tensor_type, t.name
        np.testing.assert_array_equal(mine[t.name].data, t.data, err_msg=t.name)
