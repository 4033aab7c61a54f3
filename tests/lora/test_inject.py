"""Target matching, defaults per architecture, freezing, counting, and the clear errors."""

import pytest
import torch
import transformers as tf

import lorakit
from lorakit.lora import LoraLayer, ModulesToSave
from tests.conftest import tiny


def wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def test_list_targets_match_exactly_or_as_dotted_suffix():
    model = tiny("bert")
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["query", "attention.output.dense"], r=2))
    names = wrapped(model)
    assert len(names) == 4
    assert all(n.endswith((".query", ".attention.output.dense")) for n in names)
    assert not any(n.endswith("intermediate.dense") for n in names)  # "dense" alone was not asked


def test_regex_target_must_match_the_whole_path():
    model = tiny("llama")
    lorakit.inject(model, lorakit.LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj", r=2))
    assert wrapped(model) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]


def test_all_linear_skips_the_output_head():
    model = tiny("llama")
    lorakit.inject(model, lorakit.LoraConfig(target_modules="all-linear", r=2))
    names = wrapped(model)
    assert len(names) == 2 * 7 and "lm_head" not in names


def test_exclude_and_layers_to_transform():
    model = tiny("llama")
    cfg = lorakit.LoraConfig(
        target_modules="all-linear", exclude_modules=["o_proj", "down_proj"], layers_to_transform=[1], r=2
    )
    lorakit.inject(model, cfg)
    names = wrapped(model)
    assert len(names) == 5 and all(n.startswith("model.layers.1.") for n in names)
    assert not any(n.endswith(("o_proj", "down_proj")) for n in names)


def test_rank_and_alpha_patterns():
    model = tiny("llama")
    cfg = lorakit.LoraConfig(
        r=2, lora_alpha=4, rank_pattern={"v_proj": 1}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 8}
    )
    lorakit.inject(model, cfg)
    q0 = model.model.layers[0].self_attn.q_proj
    v0 = model.model.layers[0].self_attn.v_proj
    q1 = model.model.layers[1].self_attn.q_proj
    assert (q0.rank("default"), q0.scaling["default"]) == (2, 4.0)
    assert (v0.rank("default"), v0.scaling["default"]) == (1, 4.0)
    assert (q1.rank("default"), q1.scaling["default"]) == (2, 2.0)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("bert", ["query", "value"]),
        ("gpt2", ["c_attn"]),
        ("llama", ["q_proj", "v_proj"]),
        ("t5", ["q", "v"]),
    ],
)
def test_default_targets_are_the_papers_wq_wv(kind, expected):
    model = tiny(kind)
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    leaves = {n.rsplit(".", 1)[-1] for n in wrapped(model)}
    assert leaves == set(expected)


@pytest.mark.parametrize(
    "config_cls,model_cls,leaves",
    [
        (tf.RobertaConfig, tf.RobertaModel, {"query", "value"}),
        (tf.DistilBertConfig, tf.DistilBertModel, {"q_lin", "v_lin"}),
        (tf.MistralConfig, tf.MistralModel, {"q_proj", "v_proj"}),
        (tf.Qwen2Config, tf.Qwen2Model, {"q_proj", "v_proj"}),
        (tf.OPTConfig, tf.OPTModel, {"q_proj", "v_proj"}),
    ],
)
def test_default_targets_other_architectures(config_cls, model_cls, leaves):
    with torch.device("meta"):
        model = model_cls(config_cls())
    targets = lorakit.find_targets(model, lorakit.LoraConfig(r=2))
    assert {t.name.rsplit(".", 1)[-1] for t in targets} == leaves


def test_only_adapter_params_train_and_counts_are_reported():
    model = tiny("bert")
    lorakit.inject(model, lorakit.LoraConfig(r=2, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert isinstance(model.classifier, ModulesToSave)
    count = lorakit.count_parameters(model)
    lora = 2 * 2 * (2 * 16 + 16 * 2)  # 2 layers x (q, v) x (A + B)
    head = 16 * 3 + 3
    assert (count.adapter, count.trainable) == (lora, lora + head)
    assert count.total == sum(p.numel() for p in model.parameters())
    assert "trainable params" in str(count)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes(bias):
    model = tiny("bert")
    lorakit.inject(model, lorakit.LoraConfig(r=2, bias=bias))
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    if bias == "lora_only":
        assert biases and all(n.endswith(("query.base_layer.bias", "value.base_layer.bias")) for n in biases)
    else:
        assert any("intermediate" in n for n in biases) and any("LayerNorm" in n for n in biases)


def test_paper_count_roberta_base_r8_query_value():
    with torch.device("meta"):
        model = tf.RobertaModel(tf.RobertaConfig())  # roberta-base shape
    lorakit.inject(model, lorakit.LoraConfig(r=8, target_modules=["query", "value"]))
    assert lorakit.count_parameters(model).adapter == 294_912


def test_paper_count_gpt2_medium_r4_q_v_slices_of_c_attn():
    with torch.device("meta"):
        model = tf.GPT2Model(tf.GPT2Config(n_embd=1024, n_layer=24, n_head=16))  # GPT-2 medium shape
    cfg = lorakit.LoraConfig(r=4, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]})
    assert "393,216 adapter parameters" in lorakit.dry_run(model, cfg)
    lorakit.inject(model, cfg)
    assert lorakit.count_parameters(model).adapter == 393_216


def test_dry_run_lists_without_changing_the_model():
    model = tiny("gpt2")
    report = lorakit.dry_run(model, lorakit.LoraConfig(r=2))
    assert "transformer.h.0.attn.c_attn" in report and "Conv1D" in report and "2 targets" in report
    assert wrapped(model) == []


def test_no_match_lists_candidate_names():
    with pytest.raises(lorakit.TargetError, match=r"matched no module.*candidate module names:.*q_proj"):
        lorakit.inject(tiny("llama"), lorakit.LoraConfig(target_modules=["query"]))


def test_unsupported_layer_type_is_named():
    with pytest.raises(lorakit.TargetError, match=r"cannot wrap: .*self_attn \(LlamaAttention\)"):
        lorakit.inject(tiny("llama"), lorakit.LoraConfig(target_modules=["self_attn"]))


def test_unknown_architecture_without_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(lorakit.TargetError, match="no default LoRA targets.*set target_modules"):
        lorakit.inject(model, lorakit.LoraConfig())


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("r", 0, "LoraConfig.r=0"),
        ("r", 2.5, "positive integer"),
        ("lora_alpha", -1, "lora_alpha"),
        ("lora_dropout", 1.0, r"\[0, 1\)"),
        ("bias", "some", "bias"),
        ("init_lora_weights", "xavier", "init_lora_weights"),
        ("target_modules", "(", "not a valid regular expression"),
        ("rank_pattern", {"q": 0}, "rank_pattern"),
        ("enable_lora", {"c_attn": [False, False]}, "enable_lora"),
    ],
)
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(lorakit.ConfigError, match=message):
        lorakit.LoraConfig(**{field: value})


def test_duplicate_and_invalid_adapter_names():
    model = tiny("gpt2")
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    with pytest.raises(lorakit.ConfigError, match="already has an adapter named 'default'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2))
    with pytest.raises(lorakit.ConfigError, match="adapter name '../x' is invalid"):
        lorakit.inject(model, lorakit.LoraConfig(r=2), adapter_name="../x")


def test_failed_injection_leaves_the_model_untouched():
    model = tiny("llama")
    before = wrapped(model)
    # v_proj is 16 -> 8 (GQA): r=12 fits q_proj (16x16) but not v_proj, so the rank check fails midway.
    with pytest.raises(ValueError, match="exceeds this layer's size"):
        lorakit.inject(model, lorakit.LoraConfig(r=12))
    assert wrapped(model) == before and lorakit.adapter_names(model) == []


def test_inject_returns_the_same_object_and_keeps_base_layer():
    model = tiny("llama")
    q = model.model.layers[0].self_attn.q_proj
    assert lorakit.inject(model, lorakit.LoraConfig(r=2)) is model
    assert model.model.layers[0].self_attn.q_proj.base_layer is q
