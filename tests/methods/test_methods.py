"""The LoRA paper's baselines (lorakit.methods) on tiny local models: every method trains
through `train()`, saves only what it trains and loads back onto a fresh base with the same
outputs, counts parameters by the paper's formulas, and starts from the base model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lorakit
from lorakit import methods
from lorakit.methods.adapters import WithAdapter
from lorakit.methods.errors import MethodError
from lorakit.models import load_model
from lorakit.train import TrainConfig, TrainConfigError, train
from lorakit.train.api import evaluate, load_trained
from lorakit.train.tasks import task_class

from ..conftest import tiny
from ..train.conftest import SPECIALS, WORDS, data_files, make_tokenizer, model_dirs  # noqa: F401  (fixtures)

TASK_MODEL = {"classification": "bert", "ner": "bert", "causal-lm": "llama"}
LABELS = {"classification": ["neg", "pos"], "ner": ["B-LOC", "B-PER", "O"], "causal-lm": None}
# Tiny config (tests/train/conftest.py): vocabulary V, width d, MLP f, L blocks, BERT positions.
V, d, f, L, POS = len(SPECIALS) + len(WORDS), 32, 64, 2, 64


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory):
    """The conftest's tiny BERT with initializer_range 0.2 instead of 0.02. At 0.02 every input
    gives nearly the same [CLS] vector, so only methods that rescale the weights (LoRA, full,
    top2) can separate classes in a few steps; a base whose features vary, as a pretrained one
    does, lets the methods that keep the base (bitfit, adapters, prefixes) train too."""
    import transformers as tf

    directory = tmp_path_factory.mktemp("models") / "wide-bert"
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=V,
        pad_token_id=0,
        eos_token_id=4,
        hidden_size=d,
        num_hidden_layers=L,
        num_attention_heads=2,
        intermediate_size=f,
        max_position_embeddings=POS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )
    tf.BertModel(config).save_pretrained(directory)
    make_tokenizer(directory, "bert")
    return directory


def base(model_dirs, task: str) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    loaded = load_model(str(model_dirs[TASK_MODEL[task]]), task_class(task).auto_class, label_names=LABELS[task])
    return loaded.model.eval(), loaded.new_modules


def settings(method: str, task: str, adapter_size: int = 8, prefix_length: int = 4) -> dict:
    values = {"adapter_size": adapter_size, "prefix_length": prefix_length, "task": task, "adapter_drop_layers": 1}
    return {k: values[k] for k in methods.METHODS[method].options}


def batch(task: str) -> dict[str, torch.Tensor]:
    """Three rows of 7 tokens, the first padded after 5; labels of the task's shape."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(len(SPECIALS), V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if task != "causal-lm":
        out["token_type_ids"] = torch.zeros_like(ids)
    out["labels"] = torch.tensor([0, 1, 1]) if task == "classification" else torch.randint(0, 3, (3, 7), generator=g)
    return out


def forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


NON_LORA = [m for m in methods.METHODS if m != "lora"]


# -- training through train() ------------------------------------------------------------
# (method, task): learning rate, steps. bitfit does not apply to LLaMA (no biases): see the errors.
RUNS = {
    **{
        (m, "classification"): run
        for m, run in {
            "full": (3e-3, 30),
            "top2": (3e-3, 30),
            "bitfit": (1e-2, 40),
            "adapter-h": (1e-2, 40),
            "adapter-l": (1e-2, 40),
            "adapter-p": (1e-2, 40),
            "adapter-drop": (1e-2, 40),
            "prefix-embed": (3e-2, 40),
            "prefix-layer": (3e-2, 40),
        }.items()
    },
    **{
        (m, "causal-lm"): (3e-2, 25)
        for m in ["full", "top2", "adapter-h", "adapter-l", "adapter-p", "adapter-drop", "prefix-embed"]
    },  # fmt: skip
    ("prefix-layer", "causal-lm"): (1e-1, 25),
}


@pytest.mark.parametrize("method,task", list(RUNS), ids=[f"{m}-{t}" for m, t in RUNS])
def test_every_method_trains_saves_and_loads_back(method, task, model_dirs, data_files, wide_bert, tmp_path):
    lr, steps = RUNS[method, task]
    train_file, dev_file = data_files[task]
    model = wide_bert if task == "classification" else model_dirs["llama"]
    generate = 2 if task == "causal-lm" and method != "prefix-embed" else 0  # BLEU: every method that generates
    out = tmp_path / "out"
    result = train(
        TrainConfig(
            model=str(model),
            task=task,
            data=str(train_file),
            eval_data=str(dev_file),
            output=str(out),
            method=method,
            adapter_size=8,
            prefix_length=4,
            lr=lr,
            max_steps=steps,
            batch_size=8,
            max_length=32,
            warmup_ratio=0.0,
            scheduler="constant",
            eval_generate=generate,
            max_new_tokens=4,
        ),
        callbacks=[],
    )
    curve = [r["loss"] for r in result.state.history if "loss" in r]
    assert sum(curve[-5:]) / 5 < 0.75 * sum(curve[:3]) / 3, curve
    before, after = result.summary["baseline_eval"], result.summary["final_eval"]
    assert after["loss"] < 0.75 * before["loss"]
    # The output dir holds only what the method trains, and loads onto a fresh base.
    saved = json.loads((out / methods.METHOD_CONFIG).read_text())
    assert saved["method"] == method and not (out / "adapter_config.json").exists()
    assert saved["parameters"]["paper_count"] == result.summary["trainable_params_paper"]
    assert (
        sum(t.numel() for t in load_file(out / "method_model.safetensors").values()) == saved["parameters"]["trainable"]
    )
    reloaded = evaluate(load_trained(None, out), str(dev_file), generate=generate, max_new_tokens=4)
    assert reloaded == pytest.approx(after, rel=1e-5, abs=1e-6)
    assert ("bleu" in after) == bool(generate)


# -- save / load -------------------------------------------------------------------------
CASES = (
    [(m, "classification") for m in NON_LORA]
    + [(m, "causal-lm") for m in NON_LORA if m != "bitfit"]
    + [("prefix-embed", "ner")]
)


@pytest.mark.parametrize("method,task", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_saved_method_loads_onto_a_fresh_base_with_the_same_outputs(method, task, model_dirs, tmp_path):
    model, heads = base(model_dirs, task)
    model = methods.build(model, method, settings(method, task), heads)
    with torch.no_grad():  # move every trained tensor, so nothing passes by staying at its init
        for name in methods.method_spec(model).params:
            p = model.get_parameter(name)
            p.add_(0.1 * torch.randn_like(p))
    expected = forward(model, batch(task))
    methods.save_method(model, tmp_path)
    assert set(load_file(tmp_path / "method_model.safetensors")) == set(methods.method_spec(model).params)

    fresh, _ = base(model_dirs, task)
    loaded = methods.load_method(fresh, tmp_path).eval()
    torch.testing.assert_close(forward(loaded, batch(task)), expected, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_lora_is_still_saved_in_peft_format(model_dirs, tmp_path):
    model, heads = base(model_dirs, "classification")
    lorakit.inject(model, lorakit.LoraConfig(r=4, modules_to_save=heads))
    methods.save_method(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and not methods.is_method_dir(tmp_path)


def test_a_method_dir_does_not_load_onto_another_architecture(model_dirs, tmp_path):
    model, heads = base(model_dirs, "classification")
    methods.save_method(methods.build(model, "top2", {}, heads), tmp_path)
    llama, _ = base(model_dirs, "causal-lm")
    with pytest.raises(
        methods.MethodLoadError, match="does not fit this LlamaForCausalLM.*no task-head module 'classifier'"
    ):
        methods.load_method(llama, tmp_path)
    bert, _ = base(model_dirs, "ner")  # the same blocks, a classifier of 3 labels instead of 2
    with pytest.raises(
        methods.MethodLoadError, match=r"classifier.weight: the file has shape \(2, 32\), the model expects \(3, 32\)"
    ):
        methods.load_method(bert, tmp_path)


# -- parameter counts: the paper's formulas written out for the tiny configs ------------
M, P = 8, 4  # adapter bottleneck, prefix length
HOULSBY = 2 * (d * M + M + M * d + d)  # per block: two adapters
LIN = d * M + M + M * d + d + 2 * d  # per block: one adapter with its LayerNorm
PFEIFFER = d * M + M + M * d + d  # per block: one adapter, no norm
BERT_BLOCK = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d  # q k v o, LN, MLP, LN
BERT_BIASES = d + L * (4 * d + d + f + d + d) + d  # embedding LN, blocks, pooler
BERT = V * d + POS * d + 2 * d + 2 * d + L * BERT_BLOCK + d * d + d  # embeddings, blocks, pooler
LLAMA_BLOCK = 4 * d * d + 3 * d * f + 2 * d  # q k v o, gate up down, 2 norms
LLAMA = V * d + L * LLAMA_BLOCK + d + V * d  # embeddings, blocks, norm, lm_head
KV = d  # kv heads x head dim (2 x 16)
PAPER_COUNTS = {
    "classification": {
        "full": BERT,
        "top2": L * BERT_BLOCK,
        "bitfit": BERT_BIASES,
        "adapter-h": L * HOULSBY,
        "adapter-l": L * LIN,
        "adapter-p": L * PFEIFFER,
        "adapter-drop": (L - 1) * HOULSBY,  # the lowest block dropped
        "prefix-embed": P * d,
        "prefix-layer": L * 2 * P * KV,
    },
    "causal-lm": {
        "full": LLAMA,
        "top2": L * LLAMA_BLOCK,
        "adapter-h": L * HOULSBY,
        "adapter-l": L * LIN,
        "adapter-p": L * PFEIFFER,
        "adapter-drop": (L - 1) * HOULSBY,
        "prefix-embed": P * d,
        "prefix-layer": L * 2 * P * KV,
    },
}
HEAD = {"classification": d * 2 + 2, "causal-lm": 0}  # the new classifier; a causal LM's head is pretrained


@pytest.mark.parametrize("method,task", [(m, t) for t in PAPER_COUNTS for m in PAPER_COUNTS[t]])
def test_parameter_counts_follow_the_papers_formulas(method, task, model_dirs):
    model, heads = base(model_dirs, task)
    count = methods.method_parameter_count(methods.build(model, method, settings(method, task, M, P), heads))
    assert count["paper_count"] == PAPER_COUNTS[task][method]
    assert count["head"] == HEAD[task] and count["trainable"] == count["paper_count"] + count["head"]


def test_lora_counts_A_and_B_without_the_head(model_dirs):
    model, heads = base(model_dirs, "classification")
    lorakit.inject(model, lorakit.LoraConfig(r=4, modules_to_save=heads))  # query, value
    count = methods.method_parameter_count(model)
    assert count["method"] == "lora" and count["head"] == HEAD["classification"]
    assert count["paper_count"] == L * 2 * (4 * d + d * 4)  # A [r, d] and B [d, r] of Wq and Wv per block


# -- starting point ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,task",
    [
        (m, t)
        for t in ["classification", "causal-lm"]
        for m in ["full", "top2", "bitfit", "adapter-h", "adapter-l", "adapter-p", "adapter-drop"]
        if (m, t) != ("bitfit", "causal-lm")
    ],
)
def test_methods_start_from_the_base_model(method, task, model_dirs):
    model, heads = base(model_dirs, task)
    expected = forward(model, batch(task))
    model = methods.build(model, method, settings(method, task), heads)
    assert torch.equal(forward(model, batch(task)), expected)  # zero-initialised adapters: exactly


@pytest.mark.parametrize(
    "method,task",
    [
        ("prefix-embed", "classification"),
        ("prefix-embed", "ner"),
        ("prefix-embed", "causal-lm"),
        ("prefix-layer", "causal-lm"),
    ],
)
def test_a_fresh_prefix_is_the_base_reading_its_init_tokens_first(method, task, model_dirs):
    """No prefix is the identity; a fresh one is exactly the base model given its P initial
    tokens before the input (for prefix-layer: wherever attention is causal), its logits cut
    back to the input positions; mask, token types and positions extended to match."""
    model, heads = base(model_dirs, task)
    prefixed = methods.build(model, method, settings(method, task), heads)
    inputs = batch(task)
    ids = prefixed.init_ids.expand(3, -1)
    extended = {
        "input_ids": torch.cat([ids, inputs["input_ids"]], 1),
        "attention_mask": torch.cat([torch.ones_like(ids), inputs["attention_mask"]], 1),
    }
    if "token_type_ids" in inputs:
        extended["token_type_ids"] = torch.cat([torch.zeros_like(ids), inputs["token_type_ids"]], 1)
    expected = forward(model, extended)
    expected = expected[:, P:] if task != "classification" else expected
    torch.testing.assert_close(forward(prefixed, inputs), expected, rtol=0, atol=1e-5)
    if task == "causal-lm":  # the loss on the input positions, as the model computes it
        labels = inputs["labels"].clone()
        labels[:, 0] = -100
        with torch.no_grad():
            want = model(**extended, labels=torch.cat([torch.full_like(ids, -100), labels], 1)).loss
            got = prefixed(**{**inputs, "labels": labels}).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["prefix-embed", "prefix-layer"])
def test_prefix_outputs_do_not_depend_on_padding(method, model_dirs):
    """The extended mask lines up: a padded row gives the same logits as the row alone."""
    model, heads = base(model_dirs, "ner")
    prefixed = methods.build(model, method, settings(method, "ner"), heads)
    inputs = batch("ner")
    alone = {k: v[:1, :5] for k, v in inputs.items() if k != "labels"}
    torch.testing.assert_close(forward(prefixed, inputs)[:1, :5], forward(prefixed, alone), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_adapters_find_gpt2_and_t5_projections(kind):
    model = tiny(kind)
    inputs = {"input_ids": torch.randint(2, 64, (2, 5))}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, 64, (2, 3))
    expected = forward(model, inputs)
    methods.build(model, "adapter-h", {"adapter_size": 4})
    wrapped = sorted(
        n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, WithAdapter)
    )
    blocks = 2 if kind == "gpt2" else 4  # T5: 2 encoder + 2 decoder blocks
    assert wrapped == sorted(
        (["attn.c_proj", "mlp.c_proj"] if kind == "gpt2" else ["SelfAttention.o", "DenseReluDense.wo"]) * blocks
    )
    assert torch.equal(forward(model, inputs), expected)


# -- clear errors ------------------------------------------------------------------------
def test_unknown_method_is_refused():
    with pytest.raises(TrainConfigError, match="--method='nope'.*lora, full, top2, bitfit, adapter-h"):
        TrainConfig(data="x.jsonl", method="nope")
    with pytest.raises(methods.MethodError, match="unknown method 'nope'"):
        methods.build(nn.Linear(2, 2), "nope", {})


def test_methods_refuse_what_cannot_work(model_dirs):
    llama, _ = base(model_dirs, "causal-lm")
    with pytest.raises(methods.MethodError, match="bitfit trains bias terms.*has none"):
        methods.build(llama, "bitfit", {})
    with pytest.raises(
        methods.MethodError, match="cannot find the attention and MLP output projections.*Known layouts"
    ):
        methods.build(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), "adapter-l", {"adapter_size": 2})
    with pytest.raises(methods.MethodError, match="cannot find the transformer blocks"):
        methods.build(nn.Sequential(nn.Linear(4, 4)), "top2", {})
    with pytest.raises(methods.MethodError, match="encoder-decoder"):
        methods.build(tiny("t5"), "prefix-layer", {"prefix_length": 2, "task": "seq2seq"})
    llama_classifier = load_model(
        str(model_dirs["llama"]), "AutoModelForSequenceClassification", label_names=["neg", "pos"]
    ).model
    with pytest.raises(methods.MethodError, match="last non-padding token.*use prefix-layer"):
        methods.build(llama_classifier, "prefix-embed", settings("prefix-embed", "classification"))


def greedy_by_forward(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The oracle for `generate`: greedy decoding of one unpadded prompt [1, T] by calling the
    model's forward on the whole sequence at every step (no decoding cache)."""
    for _ in range(new_tokens):
        next_id = forward(model, {"input_ids": ids})[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        ids = torch.cat([ids, next_id], dim=1)  # [1, T+1]
    return ids


def test_a_prefix_layer_model_generates_what_its_forward_predicts(model_dirs):
    """Batched, left-padded generate (the prefix as the pre-filled cache) gives, row by row, the
    greedy tokens of the prefixed forward on each prompt alone; a prefix moved off its initial
    tokens changes them, so the cache is what carries it."""
    llama, _ = base(model_dirs, "causal-lm")
    prefixed = methods.build(llama, "prefix-layer", settings("prefix-layer", "causal-lm"))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in prefixed.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    prompts = [torch.randint(len(SPECIALS), V, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 3)]
    llama.generation_config.eos_token_id = None  # decode all 6 tokens, as the oracle does
    ids = torch.zeros(2, 5, dtype=torch.long)  # left padding with id 0 (a special token)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, 5 - prompt.shape[1] :], mask[row, 5 - prompt.shape[1] :] = prompt, 1
    out = prefixed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 5 + 6)
    for row, prompt in enumerate(prompts):
        want = greedy_by_forward(prefixed, prompt, 6)
        assert torch.equal(out[row, 5:], want[0, prompt.shape[1] :])
    plain = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(out, plain)


def test_prefix_models_refuse_generation_checkpointing_and_overlong_input(model_dirs):
    llama, _ = base(model_dirs, "causal-lm")
    prefixed = methods.build(llama, "prefix-layer", settings("prefix-layer", "causal-lm", prefix_length=60))
    embed = methods.build(base(model_dirs, "causal-lm")[0], "prefix-embed", settings("prefix-embed", "causal-lm"))
    with pytest.raises(methods.MethodError, match="only causal-LM prefix-layer models generate"):
        embed.generate(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(methods.MethodError, match="exceeds the model's 64 positions"):
        prefixed.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(methods.MethodError, match="gradient-checkpointing"):
        prefixed.gradient_checkpointing_enable()
    with pytest.raises(methods.MethodError, match="exceeds the model's 64 positions"):
        prefixed(input_ids=torch.ones(1, 5, dtype=torch.long))
    config = TrainConfig(data="x.jsonl", task="causal-lm", method="prefix-embed", eval_generate=4)
    with pytest.raises(methods.MethodError, match="--eval-generate"):
        methods.apply_method(base(model_dirs, "causal-lm")[0], config, [])


def test_cli_train_help_lists_every_method_and_its_options():
    from typer.testing import CliRunner

    from lorakit.cli import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    for word in [*methods.METHODS, "--adapter-size", "--prefix-length"]:
        assert word in result.output


def test_adapter_drop_refuses_dropping_every_block(model_dirs):
    model, heads = base(model_dirs, "classification")
    with pytest.raises(MethodError, match=r"--adapter-drop-layers=2 is invalid: this model has 2 blocks; drop 0 to 1"):
        methods.build(model, "adapter-drop", {"adapter_size": 4, "adapter_drop_layers": 2}, heads)
