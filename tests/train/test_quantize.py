"""`lorakit train --quantize nf4|int8` and `lorakit.quantize_base`: the base lorakit quantises is
bit for bit the one transformers' BitsAndBytesConfig loads, a quantised run trains, resumes
exactly and saves an adapter PEFT runs on that base, and bad combinations fail before compute."""

from __future__ import annotations

import copy
import json

import bitsandbytes as bnb
import peft
import pytest
import torch
import torch.nn as nn
import transformers as tf
from safetensors.torch import load_file

import lorakit
from lorakit.models import CheckpointReader, checkpoint_reader
from lorakit.quantize import QuantizeError, dequantized_weight, quantize_base
from lorakit.train import TrainConfig, TrainConfigError, train
from lorakit.train.api import evaluate, load_trained, merge_trained

from .conftest import copy_rows, make_tokenizer, write_jsonl

BNB = {
    "nf4": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),  # fmt: skip
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A tiny LLaMA with 64-wide layers (bitsandbytes quantises in blocks of 64) and the
    word-level tokenizer of the other tests."""
    directory = tmp_path_factory.mktemp("llama64")
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=31, max_position_embeddings=64, pad_token_id=0,
                            eos_token_id=4, bos_token_id=2, initializer_range=0.3)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    make_tokenizer(directory, "llama")
    return directory


def options(llama64, tmp_path, **kw) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(tmp_path / "train.jsonl", copy_rows(48, 0))
    dev_file = write_jsonl(tmp_path / "dev.jsonl", copy_rows(8, 1))
    base = dict(model=str(llama64), task="causal-lm", data=str(train_file), eval_data=str(dev_file),
                output=str(tmp_path / "out"), batch_size=8, lr=1e-2, max_steps=12, rank=4, alpha=8, max_length=32,
                targets="all-linear", quantize="nf4", eval_before=False)  # fmt: skip
    return {**base, **kw}


@pytest.mark.parametrize("scheme,dtype", [("nf4", torch.float32), ("nf4", torch.bfloat16), ("int8", torch.float32)])
def test_quantize_base_is_what_transformers_loads(llama64, scheme, dtype):
    """Against transformers loading the same checkpoint in `dtype` with that compute dtype."""
    settings = {**BNB[scheme], **({"bnb_4bit_compute_dtype": dtype} if scheme == "nf4" else {})}
    reference = tf.AutoModelForCausalLM.from_pretrained(
        llama64, quantization_config=tf.BitsAndBytesConfig(**settings), dtype=dtype
    )
    ours = tf.AutoModelForCausalLM.from_pretrained(llama64, dtype=torch.float32)  # as lorakit train loads
    assert quantize_base(ours, scheme, compute_dtype=dtype) == 14  # 2 blocks x q, k, v, o, gate, up, down
    theirs = reference.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for key, value in ours.state_dict().items():
        if "proj" in key:  # the quantised layers: packed codes and scales, bit for bit
            assert torch.equal(value, theirs[key]), key
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight.dtype == torch.float32


def test_quantising_from_the_checkpoint_file_equals_quantising_the_loaded_weights(llama64):
    """`lorakit train --quantize --bf16` loads the base lazily in bf16 and reads each weight from
    the file; a tensor the file holds differently from the module (transformers converted it
    while loading) is read through the module instead."""
    reference = tf.AutoModelForCausalLM.from_pretrained(llama64, dtype=torch.float32)
    quantize_base(reference, "nf4", compute_dtype=torch.bfloat16)

    class Reader(CheckpointReader):
        read: list[str] = []

        def get(self, key):
            self.read.append(key)
            stored = super().get(key)
            return stored + 1 if key.endswith("0.mlp.up_proj.weight") else stored  # as if converted

    reader = Reader(sorted(llama64.glob("*.safetensors")))
    assert isinstance(checkpoint_reader(str(llama64)), CheckpointReader)
    ours = tf.AutoModelForCausalLM.from_pretrained(llama64, dtype=torch.bfloat16)
    assert quantize_base(ours, "nf4", compute_dtype=torch.bfloat16, reader=reader) == 14
    assert len(reader.read) == 14 and "model.layers.1.self_attn.q_proj.weight" in reader.read
    theirs = reference.state_dict()
    for key, value in ours.state_dict().items():
        if "proj" in key:
            assert torch.equal(value, theirs[key]), key


def test_quantize_base_keeps_heads_and_refuses_what_it_cannot_do():
    class OnlyHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(8, 64), nn.Linear(64, 8)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(QuantizeError, match="no linear layer to quantise"):
        quantize_base(OnlyHead(), "nf4")
    with pytest.raises(QuantizeError, match="unknown quantisation 'fp3'; choose one of nf4, int8"):
        quantize_base(OnlyHead(), "fp3")
    model = nn.Sequential(nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 64)))
    assert quantize_base(model, "nf4", keep=["1"]) == 1
    assert type(model[1][0]) is nn.Linear and isinstance(model[0], bnb.nn.Linear4bit)


def test_a_bf16_nf4_run_trains_an_fp32_adapter(llama64, tmp_path):
    result = train(TrainConfig(**options(llama64, tmp_path, bf16=True, lr=2e-2)), callbacks=[])
    losses = [r["loss"] for r in result.state.history if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.summary["packing"] == "on"  # the packing probe passes on a base held in bf16
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


@pytest.mark.parametrize("scheme", BNB)
def test_a_quantised_run_trains_and_peft_runs_its_adapter_on_that_base(llama64, tmp_path, scheme):
    result = train(TrainConfig(**options(llama64, tmp_path, quantize=scheme)), callbacks=[])
    losses = [r["loss"] for r in result.state.history if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    out = tmp_path / "out"
    ids = torch.tensor([[2, 27, 28, 29, 4], [2, 29, 28, 27, 4]])
    mine = lorakit.load_adapter(tf.AutoModelForCausalLM.from_pretrained(llama64, dtype=torch.float32), out)
    quantize_base(mine, scheme)  # the same blocks as in training (a deterministic quantisation)
    theirs = peft.PeftModel.from_pretrained(
        tf.AutoModelForCausalLM.from_pretrained(llama64, quantization_config=tf.BitsAndBytesConfig(**BNB[scheme])), out
    )
    mine.train(), theirs.train()  # bitsandbytes' plain path in both
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["task_type"] == "CAUSAL_LM"  # for AutoPeftModelFor..., vLLM
    assert written["base_model_name_or_path"] == str(llama64)


def test_a_quantised_run_resumes_exactly(llama64, tmp_path):
    from .test_trainer import StopAt

    kw = dict(dropout=0.1, save_every=4, eval_every=None)
    full = train(TrainConfig(**options(llama64, tmp_path / "a", **kw)), callbacks=[])
    stopped = train(TrainConfig(**options(llama64, tmp_path / "b", **kw)), callbacks=[StopAt(6)])
    assert stopped.summary["interrupted"]
    resumed = train(TrainConfig(**options(llama64, tmp_path / "b", resume=True, **kw)), callbacks=[])
    assert [r["loss"] for r in resumed.state.history if "loss" in r] == pytest.approx(
        [r["loss"] for r in full.state.history if "loss" in r], rel=1e-5
    )
    step = "checkpoints/step-0000012/adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "a" / "out" / step), load_file(tmp_path / "b" / "out" / step)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(quantize="nf3"), "--quantize='nf3' is invalid: expected one of nf4, int8"),
        (dict(method="full"), "--quantize='nf4' is invalid with --method=full: a quantised weight cannot train"),
        (dict(distributed="fsdp"), "--quantize='nf4' is invalid with --distributed fsdp"),
    ],
)
def test_bad_quantize_options_fail_before_anything_loads(kw, message, llama64, tmp_path):
    opts = options(llama64, tmp_path, **kw)
    if kw.get("method") == "full":
        opts.pop("targets")
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**opts)


def test_quantize_without_bitsandbytes_names_the_package(llama64, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(TrainConfigError, match="needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        TrainConfig(**options(llama64, tmp_path))


def test_a_qlora_adapter_evaluates_on_the_base_it_trained_on(llama64, tmp_path):
    """`lorakit eval` of a QLoRA adapter quantises the base as training did (its record), so it
    reproduces the run's own eval loss; `--quantize none` scores it on the full-precision base."""
    result = train(TrainConfig(**options(llama64, tmp_path, save_every=12, eval_every=12)), callbacks=[])
    last_eval = [r["eval_loss"] for r in result.state.history if "eval_loss" in r][-1]
    dev = str(tmp_path / "dev.jsonl")
    trained = load_trained(None, tmp_path / "out")
    assert trained.info["quantize"] == "nf4"
    assert isinstance(trained.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert evaluate(trained, dev)["loss"] == pytest.approx(last_eval, rel=1e-5)
    full = evaluate(load_trained(None, tmp_path / "out", quantize="none"), dev)["loss"]
    assert full != pytest.approx(last_eval, rel=1e-5)
    with pytest.raises(QuantizeError, match="unknown quantisation 'fp3'"):
        load_trained(None, tmp_path / "out", quantize="fp3")


@pytest.mark.parametrize("bf16", [False, True])
def test_merging_a_qlora_adapter_adds_delta_w_to_the_dequantised_weights(llama64, tmp_path, bf16):
    train(TrainConfig(**options(llama64, tmp_path, bf16=bf16, max_steps=4)), callbacks=[])
    trained = load_trained(None, tmp_path / "out")
    layer = trained.model.model.layers[1].self_attn.v_proj
    W = dequantized_weight(layer.base_layer)  # the oracle: bitsandbytes' own dequantisation
    delta = layer.scaling["default"] * layer.lora_B["default"] @ layer.lora_A["default"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    plain, drift = merge_trained(trained)
    merged = plain.model.layers[1].self_attn.v_proj
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype
    torch.testing.assert_close(merged.weight, (W + delta.detach()).to(dtype), rtol=0, atol=0)
    assert not any(not p.is_floating_point() for p in plain.parameters())
    # merging is exact up to the base dtype's round-off (in bf16: at most twice what holding
    # the merged model in bf16 rather than fp32 changes); quantising again rounds ΔW away
    ids = torch.randint(31, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = plain(input_ids=ids).logits.float()
        bf16_noise = (logits - copy.deepcopy(plain).float()(input_ids=ids).logits).abs().max() / logits.abs().max()
    assert drift["merged_drift"] < (2 * bf16_noise if bf16 else 1e-5)
    assert bf16 or drift["requantised_drift"] > 10 * drift["merged_drift"]
