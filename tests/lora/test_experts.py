"""LoRA on fused MoE expert weights (target_parameters) against PEFT 0.21 on tiny random
models of several architectures: the same outputs both ways, the same gradients and parameter
count, exact merge/unmerge, mixed batches, and clear errors."""

from __future__ import annotations

import re

import peft
import pytest
import torch
import transformers as tf

import lorakit
from lorakit.lora import LoraLayer, LoraLinear
from lorakit.lora.parameters import LoraParameter
from tests.conftest import assert_mixed_equals_alone, train_losses

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
CONFIGS = {
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=12, num_experts=4,
                                           num_experts_per_tok=2, head_dim=8, **COMMON),
    "mixtral": lambda: tf.MixtralConfig(intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, **COMMON),
    # gpt-oss stores its experts transposed ([E, in, out], `is_transposed`), with biases
    "gpt_oss": lambda: tf.GptOssConfig(intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                       **COMMON),
    "olmoe": lambda: tf.OlmoeConfig(intermediate_size=12, num_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                    eos_token_id=1, **COMMON),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(intermediate_size=16, moe_intermediate_size=12, num_experts=4,
                                           shared_expert_intermediate_size=8, num_experts_per_tok=2, **COMMON),
}  # fmt: skip
KINDS = list(CONFIGS)


def moe(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()


def ids(batch: int = 3) -> torch.Tensor:
    return torch.randint(2, 64, (batch, 7), generator=torch.Generator().manual_seed(1))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def perturb(model, seed: int = 3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)


def short(name: str) -> str:
    """A parameter's name as lorakit spells it (PEFT's `base_model.model.`, `.default.weight` dropped)."""
    name = name.replace("base_model.model.", "").replace(".default", "")
    return re.sub(r"\.(lora_[AB])\.weight$", r".\1", name)


@pytest.mark.parametrize("kind", KINDS)
def test_lorakit_expert_adapter_loads_in_peft_with_the_same_outputs(kind, tmp_path):
    model = lorakit.inject(moe(kind), lorakit.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS))
    perturb(model)
    expected = logits(model)
    assert not torch.allclose(expected, logits(moe(kind)), atol=1e-3)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(moe(kind), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_expert_adapter_loads_in_lorakit_with_the_same_outputs(kind, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)
    theirs = peft.get_peft_model(moe(kind), config).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(moe(kind), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, LoraLinear) for m in ours.modules())  # parameters only, as PEFT


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_gradients_and_parameter_count_equal_peft(kind):
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)
    ours = lorakit.inject(moe(kind), lorakit.LoraConfig(**config)).train()
    theirs = peft.get_peft_model(moe(kind), peft.LoraConfig(**config)).train()
    perturb(ours)
    perturb(theirs)
    for model in (ours, theirs):
        model(ids(), labels=ids()).loss.backward()
    ours_g = {short(n): p.grad for n, p in ours.named_parameters() if p.grad is not None}
    theirs_g = {short(n): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert ours_g.keys() == theirs_g.keys() and len(ours_g) == 2 * 4 * 2  # 2 layers x 4 wrappers x (A, B)
    for name in ours_g:
        torch.testing.assert_close(ours_g[name], theirs_g[name], rtol=1e-4, atol=1e-6)
    count = lorakit.count_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_merge_and_unmerge_are_exact(kind):
    model = lorakit.inject(moe(kind), lorakit.LoraConfig(r=2, target_parameters=EXPERTS))
    perturb(model)
    experts = model.model.layers[0].mlp.experts.holder
    before = {n: p.clone() for n, p in experts.named_parameters()}
    expected = logits(model)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    # the oracle: W[e] + s·B_e·A_e written out per expert
    layer = model.model.layers[0].mlp.experts.base_layer  # gate_up_proj (innermost)
    A = layer.lora_A["default"].view(4, 2, -1)
    B = layer.lora_B["default"].view(-1, 2, 4)
    for e in range(4):
        delta = layer.scaling["default"] * B[:, :, e] @ A[e]
        delta = delta.t() if layer.transposed else delta
        torch.testing.assert_close(experts.gate_up_proj[e], before["gate_up_proj"][e] + delta, rtol=1e-6, atol=1e-6)
    lorakit.unmerge(model)
    assert all(torch.equal(p, before[n]) for n, p in experts.named_parameters())
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, rtol=1e-5, atol=1e-5)


def test_mixed_batch_of_expert_adapters_equals_each_alone():
    model = moe("qwen3_moe")
    for name, r in (("a", 2), ("b", 3)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, target_modules=["q_proj"], target_parameters=EXPERTS), name)
    perturb(model)
    assert_mixed_equals_alone(model, ["b", None, "a"], logits)


def test_training_moves_only_the_adapter_and_the_loss_falls():
    base = moe("mixtral")
    with torch.no_grad():  # weights 15x the init's 0.02 std: a model whose experts matter to the loss
        for p in base.parameters():
            if p.dim() > 1:
                p.mul_(15)
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_losses(model, (torch.arange(12) + torch.tensor([[0], [9], [23], [40]])) % 64, steps=15, lr=2e-2)
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_deleting_the_adapters_restores_the_plain_model_and_defaults_stay_on_attention():
    model = moe("olmoe")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_parameters=EXPERTS), "x")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_parameters=["mlp.experts.down_proj"]), "y")
    assert isinstance(model.model.layers[0].mlp.experts, LoraParameter)
    lorakit.delete_adapter(model, "x")
    assert model.model.layers[0].mlp.experts.parameter_name == "down_proj"  # y's wrapper stays, alone
    lorakit.delete_adapter(model, "y")
    assert type(model.model.layers[0].mlp.experts).__name__ == "OlmoeExperts"
    torch.testing.assert_close(logits(model), logits(moe("olmoe")), rtol=0, atol=0)
    plain = lorakit.inject(moe("qwen3_moe"), lorakit.LoraConfig(r=2))  # no target_modules: the paper's q, v
    assert {p.rsplit(".", 1)[-1] for p, _ in lorakit.lora_layers(plain)} == {"q_proj", "v_proj"}


def test_what_experts_cannot_take_is_refused_before_anything_changes():
    model = moe("qwen3_moe")
    with pytest.raises(lorakit.TargetError, match=r"matched no parameter .* 3-D \(expert\) parameters: "
                       r"mlp\.experts\.down_proj, mlp\.experts\.gate_up_proj"):  # fmt: skip
        lorakit.inject(model, lorakit.LoraConfig(target_parameters=["experts.up_proj"]))
    with pytest.raises(ValueError, match="rank r=13 exceeds this layer's size"):  # an expert is 16x12
        lorakit.inject(model, lorakit.LoraConfig(r=13, target_parameters=EXPERTS))
    assert not list(lorakit.lora_layers(model))
    with pytest.raises(
        lorakit.ConfigError, match="lora_dropout=0.1 is invalid: expected 0/false with target_parameters"
    ):
        lorakit.LoraConfig(target_parameters=EXPERTS, lora_dropout=0.1)
    with pytest.raises(lorakit.ConfigError, match="use_dora=True is invalid"):
        lorakit.LoraConfig(target_parameters=EXPERTS, use_dora=True)


def test_dry_run_counts_what_inject_creates():
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS)
    report = lorakit.dry_run(moe("qwen3_moe"), config)
    assert "model.layers.0.mlp.experts.gate_up_proj" in report and "4 experts" in report and "4x24x16" in report
    created = lorakit.count_parameters(lorakit.inject(moe("qwen3_moe"), config)).adapter
    assert report.splitlines()[-1] == f"6 targets, {created:,} adapter parameters"


def test_inspect_reports_the_expert_rank_and_targets(tmp_path):
    from lorakit.inspect_adapter import describe

    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS)
    lorakit.save_adapter(lorakit.inject(moe("qwen3_moe"), config), tmp_path)
    info = describe(tmp_path)
    assert info["rank"] == "2" and info["targets"] == "q_proj, " + ", ".join(EXPERTS)
    assert info["vLLM"].startswith("not checked") and info["llama.cpp (lorakit export --format gguf)"].startswith("no:")
