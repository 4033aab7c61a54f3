"""Merge: merged equals unmerged to fp32 round-off; unmerge restores W0 bit for bit."""

import pytest
import torch

import lorakit
from lorakit.lora import LoraLayer, ModulesToSave
from tests.conftest import logits, tiny, tiny_inputs


def adapted(kind, **kw):
    """A tiny model with an adapter large enough to change its outputs visibly."""
    model = tiny(kind)
    lorakit.inject(model, lorakit.LoraConfig(r=4, init_lora_weights=False, **kw))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_(std=0.5)
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "t5"])
def test_merged_equals_unmerged(kind):
    model = adapted(kind)
    inputs = tiny_inputs(kind)
    unmerged = logits(model, inputs)
    with lorakit.disable_adapters(model):
        assert not torch.allclose(logits(model, inputs), unmerged, atol=1e-4)  # the adapter matters
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unmerge_is_bit_exact(dtype):
    model = adapted("llama").to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(1000 if dtype == torch.bfloat16 else 50):
        lorakit.merge(model)
        lorakit.unmerge(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_merge_rounds_once_from_fp32():
    model = adapted("llama").to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.weight.detach().clone()
    expected = (w0.float() + layer.delta_weight("default")).to(torch.bfloat16)
    lorakit.merge(model)
    assert torch.equal(layer.weight, expected)


def test_merged_forward_skips_the_adapter_and_disable_unmerges_temporarily():
    model = adapted("gpt2")
    inputs = tiny_inputs("gpt2")
    base = None
    with lorakit.disable_adapters(model):
        base = logits(model, inputs)
    lorakit.merge(model)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, inputs), base)
    assert all(layer.merged_adapters == ["default"] for _, layer in lorakit.lora_layers(model))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_merge_and_unload_gives_a_plain_model_that_round_trips(kind, tmp_path):
    model = adapted(kind, modules_to_save=["classifier"] if kind == "bert" else None)
    inputs = tiny_inputs(kind)
    expected = logits(model, inputs)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    torch.testing.assert_close(logits(plain, inputs), expected, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=1e-5, atol=1e-5)


def test_unload_returns_the_untouched_base():
    model = tiny("llama")
    inputs = tiny_inputs("llama")
    base = logits(model, inputs)
    lorakit.inject(model, lorakit.LoraConfig(r=2, init_lora_weights=False))
    lorakit.merge(model)
    lorakit.unload(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert torch.equal(logits(model, inputs), base)


def test_merging_into_a_tied_embedding_is_refused():
    model = tiny("gpt2")  # wte is tied to lm_head
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["wte"], init_lora_weights=False))
    with pytest.raises(RuntimeError, match="tied to lm_head.weight"):
        lorakit.merge(model)
