"""DoRA against PEFT 0.21 (same weights, same outputs and gradients) and against its formula."""

import peft
import pytest
import torch

import lorakit
from lorakit.lora.dora import weight_norm
from tests.conftest import assert_mixed_equals_alone, logits, tiny, tiny_inputs

TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}


def perturb(model, seed=3):
    """A and B far from their init, magnitudes 0.5-1.5x the rows' norms: DoRA's effect far
    above round-off."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
            elif "lora_" in name:
                p.normal_(std=0.3)


def grads(model):
    """{parameter name as lorakit spells it: gradient} (PEFT's names shortened to match)."""
    short = (
        n.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight")
        for n, _ in model.named_parameters()
    )
    return {n: p.grad for n, (_, p) in zip(short, model.named_parameters()) if p.grad is not None}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_lorakit_dora_adapter_loads_in_peft_with_the_same_outputs(kind, tmp_path):
    model = tiny(kind)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS[kind], use_dora=True))
    perturb(model)
    inputs = tiny_inputs(kind)
    expected = logits(model, inputs)
    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny(kind), tmp_path).eval()
    assert peft_model.peft_config["default"].use_dora
    torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=1e-5, atol=1e-5)
    with lorakit.disable_adapters(model):
        assert not torch.allclose(logits(model, inputs), expected, atol=1e-5)  # far above round-off


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_peft_dora_adapter_loads_in_lorakit_with_the_same_outputs(kind, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True)
    peft_model = peft.get_peft_model(tiny(kind), config).eval()
    perturb(peft_model)
    inputs = tiny_inputs(kind)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(tiny(kind), tmp_path)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_dora_starts_as_the_base_with_magnitudes_equal_to_peft():
    inputs = tiny_inputs("llama")
    base = logits(tiny("llama"), inputs)
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True))
    peft_model = peft.get_peft_model(
        tiny("llama"), peft.LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True)
    )
    torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=1e-6)
    ours = {n: p for n, p in model.named_parameters() if "magnitude" in n}
    theirs = {
        n.replace("base_model.model.", "").replace(".weight", ""): p
        for n, p in peft_model.named_parameters()
        if "magnitude" in n
    }
    assert len(ours) == 6 and ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=0)


def test_dora_gradients_equal_peft_with_the_norm_detached():
    """Same loss, same gradients for A, B and the magnitude: the norm takes no gradient in
    either (the paper's §4.3); a norm left in the graph would change the A/B gradients."""
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"], use_dora=True)
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(**config))
    peft_model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(**config))
    perturb(model)
    perturb(peft_model)
    inputs = tiny_inputs("llama")
    for m in (model, peft_model):
        m(**inputs, labels=inputs["input_ids"]).loss.backward()
    ours, theirs = grads(model), grads(peft_model)
    assert ours.keys() == theirs.keys() and len(ours) == 18
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


def test_weight_norm_expansion_equals_the_dense_norm():
    """‖W0 + s·B·A‖ per row without forming the matrix equals forming it (fp32 round-off)."""
    model = lorakit.inject(tiny("gpt2"), lorakit.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    perturb(model)
    layer = model.transformer.h[0].attn.c_attn
    dense = layer.base_weight() + layer.lora_delta("default").t()  # Conv1D: [in, out] stored
    torch.testing.assert_close(weight_norm(layer, "default"), torch.linalg.norm(dense, dim=1), rtol=1e-5, atol=1e-6)


def test_dora_forward_matches_the_formula_with_dropout():
    """Training with dropout: the base term is taken on the dropped input too (PEFT's rule)."""
    model = lorakit.inject(
        torch.nn.Sequential(torch.nn.Linear(8, 6)),
        lorakit.LoraConfig(r=2, target_modules=["0"], use_dora=True, lora_dropout=0.5),
    )
    perturb(model)
    layer, x = model[0], torch.randn(5, 8)
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = torch.nn.functional.dropout(x, 0.5)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    g = layer.lora_magnitude_vector["default"] / torch.linalg.norm(W0 + s * B @ A, dim=1)
    expected = (x @ W0.t() + b) + (g - 1) * (xd @ W0.t()) + g * s * (xd @ A.t() @ B.t())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dora_merge_equals_the_unmerged_forward_and_unmerges_bit_for_bit(kind):
    model = lorakit.inject(tiny(kind), lorakit.LoraConfig(r=4, target_modules=TARGETS[kind], use_dora=True))
    perturb(model)
    inputs = tiny_inputs(kind)
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    expected = logits(model, inputs)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "base_layer" in n)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    plain = lorakit.merge_and_unload(model)
    torch.testing.assert_close(logits(plain, inputs), expected, rtol=1e-5, atol=1e-5)


def test_dora_merge_equals_peft_merge(tmp_path):
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True))
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    ours = lorakit.merge_and_unload(model).state_dict()
    theirs = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_mixed_batch_of_dora_and_plain_adapters_equals_each_alone():
    model = tiny("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True), "dora")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=TARGETS["llama"]), "plain")
    perturb(model)
    inputs = tiny_inputs("llama", batch=3)
    assert_mixed_equals_alone(model, ["plain", "dora", None], lambda m: logits(m, inputs))


def test_two_active_dora_adapters_sum_their_updates_and_merge_the_same():
    """Each adapter's DoRA term is taken against the base output, so merging both is exact."""
    model = tiny("llama")
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), name)
    perturb(model)
    inputs = tiny_inputs("llama")
    lorakit.set_adapter(model, ["a", "b"])
    expected = logits(model, inputs)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_dora_counts_and_trains_its_magnitude(tmp_path):
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    count = lorakit.count_parameters(model)
    # q_proj 16x16 in 2 layers: A 4x16 + B 16x4 + m 16 per layer
    assert count.adapter == count.trainable == 2 * (64 + 64 + 16)
    peft_model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert peft_model.get_nb_trainable_parameters()[0] == count.trainable
    lorakit.delete_adapter(model, "default")
    assert not any("magnitude" in n for n, _ in model.named_parameters())


def test_dora_on_an_embedding_is_refused_and_nothing_is_left():
    model = tiny("bert")
    with pytest.raises(ValueError, match="DoRA .* linear layers.*Embedding"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["query", "word_embeddings"], use_dora=True))
    assert not list(lorakit.lora_layers(model))


def test_dora_adapters_cannot_be_combined():
    model = tiny("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "b")
    with pytest.raises(lorakit.ConfigError, match=r"\['a'\] are DoRA"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab")


def test_a_dora_adapter_is_not_exported_to_gguf_and_inspect_says_why(tmp_path):
    from lorakit.inspect_adapter import describe
    from lorakit.lora import read_adapter_weights
    from lorakit.lora.gguf_adapter import GGUFAdapterError, exportable_pairs

    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, use_dora=True))
    lorakit.save_adapter(model, tmp_path)
    config, state = lorakit.LoraConfig.from_pretrained(tmp_path), read_adapter_weights(tmp_path)
    with pytest.raises(GGUFAdapterError, match="DoRA adapter .* merge it instead"):
        exportable_pairs(config, state)
    assert describe(tmp_path)["llama.cpp (lorakit export --format gguf)"].startswith("no: a DoRA adapter")
