"""llama.cpp itself runs what `lorakit export` writes (slow: needs llama-cpp-python, a 4-minute
build: `make test-engines`; see ../shared/notes/engines.md). A tiny LLaMA written as a Q8_0 GGUF
the way llama.cpp's converter writes one, a random adapter exported to GGUF: llama.cpp's logits
with the adapter land on lorakit's (on the same blocks) far closer than the adapter moves them.
Then tiny LLaMA, Mistral, Qwen2 and Qwen3 bases written by llama.cpp's own converter, with
and without an embedding LoRA, and the tied-head case lorakit refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.export import export_adapter
from lorakit.train.api import load_base

from .gguf_files import tiny_llama_gguf

llama_cpp = pytest.importorskip("llama_cpp")


def random_adapter(model, tmp_path: Path, base: str, **config) -> Path:
    """A random (non-zero) adapter on `model`, saved and exported to GGUF for base `base`."""
    lorakit.inject(model, lorakit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **config}))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_(std=0.5)
            if isinstance(layer.base_layer, torch.nn.Embedding):  # its A starts at zero
                layer.lora_A["default"].normal_(std=0.5)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return export_adapter(tmp_path / "adapter", "gguf", tmp_path / "adapter.gguf", model=base)[0]


@pytest.mark.slow
def test_llama_cpp_applies_an_exported_adapter_as_lorakit_does(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    base = tiny_llama_gguf(tmp_path / "base", "Q8_0")
    ours = load_base(str(base), "causal-lm", quantize="gguf").eval()
    gguf_lora = random_adapter(ours, tmp_path, str(base))
    ids = [5, 17, 30, 42, 61, 77, 3, 9]
    with torch.no_grad():
        mine = ours(input_ids=torch.tensor([ids])).logits[0]
        with lorakit.disable_adapters(ours):
            mine_base = ours(input_ids=torch.tensor([ids])).logits[0]
    results = {}
    for name, lora_path in (("base", None), ("adapter", str(gguf_lora))):
        engine = llama_cpp.Llama(model_path=str(base), lora_path=lora_path, n_ctx=64, logits_all=True, verbose=False)
        engine.eval(ids)
        results[name] = torch.tensor(engine.scores[: len(ids)])
    moved = (mine - mine_base).abs().max()
    assert (results["base"] - mine_base).abs().max() < 0.1 * moved  # the yardstick: same base
    assert (results["adapter"] - mine).abs().max() < 0.1 * moved  # the adapter, applied alike


def sentencepiece_tokenizer(directory: Path) -> int:
    """A small SentencePiece vocabulary (tokenizer.model) in `directory`, the kind llama.cpp's
    converter reads for LLaMA and Qwen2 alike without a pre-tokenizer hash; returns its size."""
    import io

    spm = pytest.importorskip("sentencepiece")  # the converter imports it too
    text = [f"the quick brown fox {i} jumps over the lazy dog near river bank {i * 7}" for i in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=120,
                                   model_type="bpe", minloglevel=2)  # fmt: skip
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def converted_base(tmp_path: Path, llama_cpp_source: Path, arch: str, tied: bool = False):
    """A tiny random transformers model of `arch` and the GGUF llama.cpp's own convert_hf_to_gguf.py
    writes for it (LLaMA's and Mistral's q/k rows permuted): (model, its directory, the GGUF)."""
    import os
    import subprocess
    import sys

    import transformers as tf

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    vocab = sentencepiece_tokenizer(hf_dir)
    config_class, model_class = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                                 "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                                 "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                                 "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[arch]  # fmt: skip
    torch.manual_seed(0)
    model = model_class(config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=128,
                                     initializer_range=0.1, tie_word_embeddings=tied)).eval()  # fmt: skip
    model.save_pretrained(hf_dir)
    env = {**os.environ, "PYTHONPATH": f"{llama_cpp_source / 'gguf-py'}:{llama_cpp_source}"}
    converted = subprocess.run([sys.executable, str(llama_cpp_source / "convert_hf_to_gguf.py"), str(hf_dir),
                                "--outfile", str(tmp_path / "base.gguf"), "--outtype", "f32"],
                               capture_output=True, text=True, env=env)  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    return model, hf_dir, tmp_path / "base.gguf"


@pytest.mark.slow
@pytest.mark.parametrize("targets", ["all-linear", ["embed_tokens", "q_proj", "k_proj", "down_proj"]])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_on_a_base_llama_cpps_own_converter_wrote(tmp_path, llama_cpp_source, arch, targets):
    """A random rsLoRA adapter exported by lorakit (an embedding LoRA among its targets in the
    second case) on a base llama.cpp's converter wrote: llama.cpp's logits equal lorakit's on the
    HF model, with and without the adapter."""
    model, hf_dir, base = converted_base(tmp_path, llama_cpp_source, arch)
    gguf_lora = random_adapter(model, tmp_path, str(hf_dir), use_rslora=True, target_modules=targets)
    ids = [1, 50, 34, 14, 28, 30, 9, 27]
    with torch.no_grad():
        mine = model(input_ids=torch.tensor([ids])).logits[0]
        with lorakit.disable_adapters(model):
            mine_base = model(input_ids=torch.tensor([ids])).logits[0]
    for expected, lora_path in ((mine_base, None), (mine, str(gguf_lora))):
        engine = llama_cpp.Llama(model_path=str(base), lora_path=lora_path, n_ctx=64, logits_all=True, verbose=False)
        engine.eval(ids)
        theirs = torch.tensor(engine.scores[: len(ids)])
        assert (theirs - expected).abs().max() < 1e-2 * expected.abs().max(), lora_path
    assert (mine - mine_base).abs().max() > 0.2 * mine_base.abs().max()  # the adapter matters


@pytest.mark.slow
def test_llama_cpp_aborts_on_an_embedding_lora_over_a_tied_head(tmp_path, llama_cpp_source):
    """Why `lorakit export` refuses that adapter: llama.cpp finds a LoRA by tensor name, and the tied
    head is the embedding table under the same name, so it multiplies the head by the embedding's
    pair and a shape assertion aborts the process. (If this starts passing, lift the refusal.)"""
    import subprocess
    import sys

    from lorakit.lora.gguf_adapter import export_gguf
    from lorakit.lora.io import read_adapter_weights

    model, _, base = converted_base(tmp_path, llama_cpp_source, "llama", tied=True)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    untied = {**model.config.to_dict(), "tie_word_embeddings": False}  # past the refusal, to see why it is there
    config, state = lorakit.LoraConfig.from_pretrained(tmp_path / "adapter"), read_adapter_weights(tmp_path / "adapter")
    export_gguf(config, state, untied, tmp_path / "adapter.gguf")
    lora = str(tmp_path / "adapter.gguf")
    code = f"import llama_cpp; llama_cpp.Llama(model_path={str(base)!r}, lora_path={lora!r}, verbose=0).eval([1, 5])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "ggml_can_mul_mat" in run.stderr, run.stderr[-2000:]
