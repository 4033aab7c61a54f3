"""PEFT's on-disk format, both ways, and strict, safe loading."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.lora.io import AdapterLoadError
from tests.conftest import logits, tiny, tiny_inputs

TARGETS = {
    "gpt2": ["c_attn", "c_fc"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "word_embeddings"],
    "t5": ["q", "v", "wo"],
}
SAVE = {"bert": ["classifier"]}


def randomize(model, std=0.3, seed=3):
    """Adapters whose effect is far above round-off, whatever their init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(std=std)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "t5"])
def test_lorakit_adapter_loads_in_peft_with_the_same_outputs(kind, tmp_path):
    model = tiny(kind)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS[kind], modules_to_save=SAVE.get(kind)))
    randomize(model)
    inputs = tiny_inputs(kind)
    expected = logits(model, inputs)
    lorakit.save_adapter(model, tmp_path)
    with lorakit.disable_adapters(model):
        assert not torch.allclose(logits(model, inputs), expected, atol=1e-3)
    peft_model = peft.PeftModel.from_pretrained(tiny(kind), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "t5"])
def test_peft_adapter_loads_in_lorakit_with_the_same_outputs(kind, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], modules_to_save=SAVE.get(kind))
    peft_model = peft.get_peft_model(tiny(kind), config).eval()
    randomize(peft_model)
    inputs = tiny_inputs(kind)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(tiny(kind), tmp_path)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference


def test_saved_files_use_peft_key_names(tmp_path):
    model = tiny("bert")
    lorakit.inject(
        model,
        lorakit.LoraConfig(
            r=2, target_modules=["query", "word_embeddings"], modules_to_save=["classifier"], bias="lora_only"
        ),
    )
    lorakit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["query", "word_embeddings"]
    )


def test_trained_biases_round_trip_through_peft(tmp_path):
    model = tiny("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear", bias="all"))
    randomize(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.5)
    inputs = tiny_inputs("llama")
    expected = logits(model, inputs)
    lorakit.save_adapter(model, tmp_path)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny("llama"), tmp_path), inputs), expected)


def test_per_slice_adapter_is_saved_in_plain_peft_form(tmp_path):
    model = tiny("gpt2")
    lorakit.inject(
        model,
        lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]}),
    )
    randomize(model)
    inputs = tiny_inputs("gpt2")
    expected = logits(model, inputs)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and "enable_lora" not in config
    assert set(config["rank_pattern"].values()) == {4}  # k·r = 2·2 in PEFT's plain form
    peft_model = peft.PeftModel.from_pretrained(tiny("gpt2"), tmp_path)
    torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=1e-5, atol=1e-5)
    reloaded = lorakit.load_adapter(tiny("gpt2"), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=1e-5, atol=1e-5)


def test_combined_adapter_saves_and_reloads(tmp_path):
    model = tiny("llama")
    for name, r in (("a", 2), ("b", 4)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=3 * r), adapter_name=name)
    randomize(model)
    lorakit.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab", combination="svd", svd_rank=3)
    lorakit.set_adapter(model, "ab")
    inputs = tiny_inputs("llama")
    expected = logits(model, inputs)
    lorakit.save_adapter(model, tmp_path, "ab")
    torch.testing.assert_close(logits(lorakit.load_adapter(tiny("llama"), tmp_path), inputs), expected)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny("llama"), tmp_path), inputs), expected)


def test_load_second_adapter_and_switch(tmp_path):
    """Two different adapters from two files: each, when active, gives its source model's logits."""
    sources, inputs = {}, tiny_inputs("llama")
    for name, seed in (("one", 1), ("two", 2)):
        model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=2))
        randomize(model, seed=seed)
        lorakit.save_adapter(model, tmp_path / name)
        sources[name] = logits(model, inputs)
    assert not torch.allclose(sources["one"], sources["two"])
    fresh = tiny("llama")
    lorakit.load_adapter(fresh, tmp_path / "one", "x")
    lorakit.load_adapter(fresh, tmp_path / "two", "y")
    assert lorakit.adapter_names(fresh) == ["x", "y"] and lorakit.active_adapters(fresh) == ["x"]
    torch.testing.assert_close(logits(fresh, inputs), sources["one"])
    lorakit.set_adapter(fresh, "y")
    torch.testing.assert_close(logits(fresh, inputs), sources["two"])
    lorakit.set_adapter(fresh, "x")
    torch.testing.assert_close(logits(fresh, inputs), sources["one"])


# -- strict and safe loading ----------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = tiny("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    randomize(model)
    lorakit.save_adapter(model, tmp_path)
    return tmp_path


def _edit_weights(path, edit):
    state = load_file(path / "adapter_model.safetensors")
    edit(state)
    save_file(state, path / "adapter_model.safetensors")


def _assert_untouched(model):
    assert lorakit.adapter_names(model) == []
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())


def test_missing_key_is_named(saved):
    _edit_weights(saved, lambda s: s.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    model = tiny("llama")
    with pytest.raises(AdapterLoadError, match=r"1 missing key\(s\): .*layers.1.self_attn.v_proj.lora_B.weight"):
        lorakit.load_adapter(model, saved)
    _assert_untouched(model)


def test_unexpected_key_is_named(saved):
    _edit_weights(saved, lambda s: s.update({"base_model.model.model.extra.lora_A.weight": torch.zeros(2, 2)}))
    with pytest.raises(AdapterLoadError, match=r"1 unexpected key\(s\): base_model.model.model.extra"):
        lorakit.load_adapter(tiny("llama"), saved)


def test_rank_mismatch_is_named(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(AdapterLoadError, match=r"the file has shape \(2, 16\), the model expects \(3, 16\).*r=3"):
        lorakit.load_adapter(tiny("llama"), saved)


def test_adapter_for_another_architecture(saved):
    with pytest.raises(AdapterLoadError, match=r"does not fit this GPT2LMHeadModel.*candidate module names"):
        lorakit.load_adapter(tiny("gpt2"), saved)


def test_pickle_is_refused_unless_asked_for(saved):
    state = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(state, saved / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle.*allow_pickle=True"):
        lorakit.load_adapter(tiny("llama"), saved)
    model = lorakit.load_adapter(tiny("llama"), saved, allow_pickle=True)
    assert lorakit.adapter_names(model) == ["default"]


def test_truncated_file_gives_a_clear_error(saved):
    file = saved / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-40])
    model = tiny("llama")
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        lorakit.load_adapter(model, saved)
    _assert_untouched(model)


def test_nan_weights_are_refused(saved):
    _edit_weights(
        saved, lambda s: s["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].fill_(float("nan"))
    )
    with pytest.raises(AdapterLoadError, match="NaN or infinite"):
        lorakit.load_adapter(tiny("llama"), saved)


def test_unsupported_peft_feature_is_refused(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(lorakit.ConfigError, match="lora_bias"):
        lorakit.load_adapter(tiny("llama"), saved)


def test_missing_directory_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lorakit.load_adapter(tiny("llama"), tmp_path / "nowhere")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lorakit.ConfigError, match="not valid JSON"):
        lorakit.load_adapter(tiny("llama"), tmp_path)


def test_interrupted_save_leaves_the_old_files_intact(saved, monkeypatch):
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    model = tiny("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2))

    def crash(state, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("lorakit.lora.io.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(model, saved)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before  # no temp files left either
