"""PiSSA and OLoRA initialisation against PEFT 0.21: the same factors and residual for the
same weights and seed, PEFT's plain-LoRA conversion at save, and both forms loading both ways."""

import re

import peft
import pytest
import torch

import lorakit
from lorakit.lora import read_adapter_weights
from tests.conftest import logits, tiny, tiny_inputs

# PEFT warns that PiSSA/OLoRA change the base weights: known, and what these tests check
pytestmark = pytest.mark.filterwarnings("ignore:.*changes the base weights:UserWarning")
INITS = ["pissa", "pissa_niter_4", "olora"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def both(init: str, seed: int = 5, **extra):
    """lorakit and PEFT given the same base and seed."""
    ours, theirs = tiny("llama"), tiny("llama")
    torch.manual_seed(seed)
    lorakit.inject(ours, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **extra))
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **extra)
    return ours, peft.get_peft_model(theirs, config)


def tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter under lorakit's spelling of its name (PEFT's shortened to match)."""
    short = (re.sub(r"\.(lora_[AB])\.weight$", r".\1", n.replace("base_model.model.", "").replace(".default", ""))
             for n, _ in model.named_parameters())  # fmt: skip
    return {n: p for n, (_, p) in zip(short, model.named_parameters())}


def train_a_little(model, steps: int = 3):
    """A few real optimizer steps: the adapter moves away from its init."""
    inputs = tiny_inputs("llama")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("init", INITS)
def test_factors_and_residual_equal_peft_for_the_same_weights_and_seed(init):
    ours, theirs = both(init)
    ours_t, theirs_t = tensors(ours), tensors(theirs)
    assert ours_t.keys() == theirs_t.keys()
    for name in ours_t:  # A, B and the residual base weights alike
        torch.testing.assert_close(ours_t[name], theirs_t[name], rtol=1e-5, atol=1e-6, msg=name)
    changed = [
        n
        for n in ours_t
        if "base_layer" in n and not torch.equal(ours_t[n], tensors(tiny("llama"))[n.replace(".base_layer", "")])
    ]
    assert len(changed) == 6  # every targeted weight now holds its residual


@pytest.mark.parametrize("init", INITS)
def test_the_model_computes_what_it_did_at_the_start(init):
    inputs = tiny_inputs("llama")
    model, _ = both(init)
    torch.testing.assert_close(logits(model, inputs), logits(tiny("llama"), inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_the_saved_adapter_is_peft_s_plain_lora_conversion(init, tmp_path):
    """Trained, saved: lorakit writes the rank-2r plain adapter PEFT's conversion writes from
    the same weights, and it gives the trained model's outputs on the untouched base, in PEFT
    and in lorakit."""
    ours, theirs = both(init)
    # PEFT converts against the initial adapter, saved with init_lora_weights=True (its docs' recipe)
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = init
    train_a_little(ours)
    with torch.no_grad():  # the same trained factors in PEFT's model
        for name, p in tensors(theirs).items():
            if "lora_" in name:
                p.copy_(tensors(ours)[name])
    inputs = tiny_inputs("llama")
    expected = logits(ours, inputs)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours_files, theirs_files = read_adapter_weights(tmp_path / "ours"), read_adapter_weights(tmp_path / "theirs")
    assert ours_files.keys() == theirs_files.keys()
    for key in ours_files:
        assert ours_files[key].shape[0 if "lora_A" in key else 1] == 8  # rank doubled
        torch.testing.assert_close(ours_files[key], theirs_files[key], rtol=1e-5, atol=1e-6)
    config = lorakit.LoraConfig.from_pretrained(tmp_path / "ours")
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 16, True)
    loaded = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=1e-4, atol=1e-5)
    mine = lorakit.load_adapter(tiny("llama"), tmp_path / "ours")
    torch.testing.assert_close(logits(mine, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_adapter_as_trained_loads_by_redoing_the_init_in_peft_and_lorakit(init, tmp_path):
    ours, _ = both(init)
    train_a_little(ours)
    inputs = tiny_inputs("llama")
    expected = logits(ours, inputs)
    lorakit.save_adapter(ours, tmp_path, as_lora=False)
    config = lorakit.LoraConfig.from_pretrained(tmp_path)
    assert (config.r, config.init_lora_weights) == (4, init)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny("llama"), tmp_path), inputs), expected,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(logits(lorakit.load_adapter(tiny("llama"), tmp_path), inputs), expected,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_pissa_with_dora_converts_with_its_magnitudes(tmp_path):
    ours, _ = both("pissa", use_dora=True)
    train_a_little(ours)
    inputs = tiny_inputs("llama")
    expected = logits(ours, inputs)
    lorakit.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=1e-4, atol=1e-5)


def test_merge_and_delete_give_back_the_trained_and_the_original_weights():
    model, _ = both("pissa")
    train_a_little(model)
    inputs = tiny_inputs("llama")
    expected = logits(model, inputs)
    merged = lorakit.merge_and_unload(model)
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)
    model, _ = both("olora")
    lorakit.delete_adapter(model, "default")
    original = tiny("llama").state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=1e-6)


def test_what_pissa_cannot_do_is_refused_before_the_weights_change():
    model = tiny("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "plain")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="residual; the adapters already on this layer \\(plain\\)"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"), "p")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    pissa = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="olora"))
    with pytest.raises(ValueError, match="holds the residual of default's PiSSA/OLoRA init; another adapter cannot"):
        lorakit.inject(pissa, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "later")
    with pytest.raises(ValueError, match="from a linear layer's weight; this target is of type Embedding"):
        lorakit.inject(tiny("bert"), lorakit.LoraConfig(target_modules=["word_embeddings"], init_lora_weights="olora"))
    with pytest.raises(lorakit.ConfigError, match="init_lora_weights='pissa_niter_x' is invalid"):
        lorakit.LoraConfig(init_lora_weights="pissa_niter_x")
