"""Several adapters on one base: activate, sum, delete, combine, mixed batches."""

import pytest
import torch

import lorakit
from tests.conftest import Toy, logits, tiny, tiny_inputs


def two_adapters(kind="llama"):
    model = tiny(kind)
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2 if name == "a" else 4, init_lora_weights=False), adapter_name=name)
    return model


def delta(model, name):
    return {path: layer.delta_weight(name) for path, layer in lorakit.lora_layers(model)}


def test_switch_sum_and_delete():
    model = two_adapters()
    inputs = tiny_inputs("llama")
    assert lorakit.adapter_names(model) == ["a", "b"] and lorakit.active_adapters(model) == ["a"]
    out_a = logits(model, inputs)
    lorakit.set_adapter(model, "b")
    out_b = logits(model, inputs)
    assert not torch.allclose(out_a, out_b)
    lorakit.set_adapter(model, ["a", "b"])  # summed: equals merging both
    both = logits(model, inputs)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, inputs), both, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["a"]
    torch.testing.assert_close(logits(model, inputs), out_a)


def test_unknown_adapter_names_the_known_ones():
    model = two_adapters()
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['c'\].*\['a', 'b'\]"):
        lorakit.set_adapter(model, "c")


def test_set_trainable_follows_the_adapter():
    model = two_adapters()
    lorakit.set_trainable(model, "a")
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"a"}


def test_cat_combination_is_exact():
    model = two_adapters()
    lorakit.add_weighted_adapter(model, ["a", "b"], [0.7, -0.3], "mix", combination="cat")
    da, db, dm = delta(model, "a"), delta(model, "b"), delta(model, "mix")
    for path in dm:
        torch.testing.assert_close(dm[path], 0.7 * da[path] - 0.3 * db[path], rtol=1e-5, atol=1e-6)
    assert model.model.layers[0].self_attn.q_proj.rank("mix") == 6


def test_svd_combination_is_the_best_rank_k_approximation():
    model = two_adapters()
    lorakit.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "svd3", combination="svd", svd_rank=3)
    lorakit.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "svd6", combination="svd", svd_rank=6)
    da, db = delta(model, "a"), delta(model, "b")
    for path, layer in lorakit.lora_layers(model):
        target = da[path] + db[path]
        torch.testing.assert_close(layer.delta_weight("svd6"), target, rtol=1e-4, atol=1e-5)  # full rank: exact
        U, S, Vh = torch.linalg.svd(target)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(layer.delta_weight("svd3"), best, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [["b", None, "a", "b"], ["c"] * 4, [None] * 4], ids=["mixed", "one", "none"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "t5"])
def test_mixed_batch_rows_equal_each_adapter_alone(kind, rows):
    model = tiny(kind)
    for name in ("a", "b", "c"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, init_lora_weights=False), adapter_name=name)
    inputs = tiny_inputs(kind, batch=4)
    with lorakit.mixed_batch(model, rows):
        mixed = logits(model, inputs)
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                alone = logits(model, inputs)
        else:
            lorakit.set_adapter(model, name)
            alone = logits(model, inputs)
        torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-5)


def test_mixed_batch_trains_each_row_into_its_own_adapter():
    model = two_adapters()
    for name in ("a", "b"):
        for _, layer in lorakit.lora_layers(model):
            layer.lora_A[name].requires_grad_(True)
            layer.lora_B[name].requires_grad_(True)
    inputs = tiny_inputs("llama", batch=2)
    with lorakit.mixed_batch(model, ["a", "b"]):
        model(**inputs).logits[0].sum().backward()  # only row 0 (adapter a) in the loss
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_B["a"].grad.abs().sum() > 0
    assert q.lora_B["b"].grad is None or q.lora_B["b"].grad.abs().sum() == 0
    # The gradient equals the one adapter "a" gets when run alone on that row.
    expected = q.lora_B["a"].grad.clone()
    model.zero_grad()
    lorakit.set_adapter(model, "a")
    model(input_ids=inputs["input_ids"][:1]).logits[0].sum().backward()
    torch.testing.assert_close(q.lora_B["a"].grad, expected, rtol=1e-4, atol=1e-6)


def test_mixed_batch_under_generate():
    model = two_adapters()
    prompt = tiny_inputs("llama", batch=2)["input_ids"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with lorakit.mixed_batch(model, ["b", "a"]):
        mixed = model.generate(prompt, **kw)
    for i, name in enumerate(["b", "a"]):
        lorakit.set_adapter(model, name)
        assert torch.equal(mixed[i], model.generate(prompt[i : i + 1], **kw)[0])


def test_mixed_batch_on_every_layer_type(toy_inputs):
    model = Toy().eval()
    for name in ("a", "b"):
        lorakit.inject(
            model,
            lorakit.LoraConfig(r=2, init_lora_weights=False, target_modules=["emb", "conv", "fc1"]),
            adapter_name=name,
        )
    ids, image = toy_inputs
    with lorakit.mixed_batch(model, ["a", "b", None]):
        mixed = model(ids, image)
    for i, name in enumerate(["a", "b"]):
        lorakit.set_adapter(model, name)
        torch.testing.assert_close(mixed[i], model(ids, image)[i], rtol=1e-5, atol=1e-5)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(mixed[2], model(ids, image)[2], rtol=1e-5, atol=1e-5)


def test_mixed_batch_length_mismatch_is_explained():
    model = two_adapters()
    with pytest.raises(ValueError, match="one name \\(or None\\) per row"):
        with lorakit.mixed_batch(model, ["a", "b"]):
            model(**tiny_inputs("llama", batch=3))
