"""llama.cpp itself runs what `lorakit export` writes (slow: needs llama-cpp-python, a 4-minute
build; see ../shared/notes/engines.md). A tiny LLaMA written as a Q8_0 GGUF the way llama.cpp's
converter writes one, a random adapter exported to GGUF: llama.cpp's logits with the adapter
land on lorakit's (on the same blocks) far closer than the adapter moves them."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.export import export_adapter
from lorakit.train.api import load_base

from .gguf_files import tiny_llama_gguf

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.mark.slow
def test_llama_cpp_applies_an_exported_adapter_as_lorakit_does(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    base = tiny_llama_gguf(tmp_path / "base", "Q8_0")
    ours = load_base(str(base), "causal-lm", quantize="gguf").eval()
    lorakit.inject(ours, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(ours):
            layer.lora_B["default"].normal_(std=0.5)
    lorakit.save_adapter(ours, tmp_path / "adapter")
    gguf_lora = export_adapter(tmp_path / "adapter", "gguf", tmp_path / "adapter.gguf", model=str(base))[0]
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
