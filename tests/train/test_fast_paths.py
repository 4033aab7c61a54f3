"""The training fast paths give the same numbers as the plain computation: logits only at
loss targets, teacher forcing without a second loss, frozen base weights held in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lorakit
from lorakit.train import TrainConfig, train
from lorakit.train.tasks import IGNORE, make_task
from lorakit.train.trainer import hold_frozen_in_bf16

from .conftest import make_model_dir


def tiny(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    directory = make_model_dir(tmp_path, kind)
    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    return auto.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


ROWS = [
    {"prompt": "a b", "response": "b a"},
    {"prompt": "a b c d a", "response": "d"},
    {"prompt": "c", "response": "a b c d a b"},
]


def test_causal_lm_logits_only_at_targets_equal_the_full_loss_and_gradients(tmp_path):
    model, tok = tiny(tmp_path, "llama")
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    )
    task = make_task("causal-lm", tok, 32)
    batch = task.collate(task.encode_all(ROWS))  # prompts of different lengths, right padding
    inputs = task.model_inputs(batch, model)
    assert "labels" not in inputs and inputs["logits_to_keep"].dtype == torch.bool

    fast = task.loss_sum(model(**inputs), batch)
    fast.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    # The oracle: logits at every position, shifted by hand.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    full = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    full.backward()
    assert model(**inputs).logits.shape[0] == int((labels != IGNORE).sum()) == task.count_targets(task.encode_all(ROWS))
    torch.testing.assert_close(fast, full)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_grads[name], p.grad, msg=name)


def test_seq2seq_teacher_forcing_matches_the_model_s_own_loss(tmp_path):
    model, tok = tiny(tmp_path, "t5")
    task = make_task("seq2seq", tok, 32)
    batch = task.collate(task.encode_all([{"source": r["prompt"], "target": r["response"]} for r in ROWS]))
    inputs = task.model_inputs(batch, model)
    assert "labels" not in inputs and "decoder_input_ids" in inputs
    ours = task.loss_sum(model(**inputs), batch)
    own = model(**{k: v for k, v in batch.items()}).loss  # HF: mean over the target tokens
    torch.testing.assert_close(ours / (batch["labels"] != IGNORE).sum(), own)


def test_hold_frozen_in_bf16_keeps_trainables_fp32(tmp_path):
    model, _ = tiny(tmp_path, "llama")
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert hold_frozen_in_bf16(model) == 2 * frozen
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert model.lm_head.weight is model.model.embed_tokens.weight or model.lm_head.weight.dtype == torch.bfloat16


def test_bf16_training_tracks_fp32_and_saves_an_fp32_adapter(model_dirs, data_files, tmp_path):
    train_file, dev_file = data_files["causal-lm"]
    options = dict(
        model=str(model_dirs["llama"]),
        task="causal-lm",
        data=str(train_file),
        eval_data=str(dev_file),
        batch_size=8,
        lr=3e-2,
        max_steps=20,
        rank=4,
        alpha=8,
        warmup_ratio=0.0,
        max_length=32,
        targets=["q_proj", "v_proj"],
        scheduler="constant",
    )
    runs = {
        bf16: train(TrainConfig(output=str(tmp_path / f"bf16-{bf16}"), bf16=bf16, **options), callbacks=[])
        for bf16 in (False, True)
    }
    fp32_curve, bf16_curve = ([r["loss"] for r in runs[b].state.history if "loss" in r] for b in (False, True))
    assert bf16_curve[-1] < 0.8 * bf16_curve[0]
    # bf16 rounding (8 bits of mantissa) moves the curve by about a percent, not more.
    assert bf16_curve[0] == pytest.approx(fp32_curve[0], rel=0.02)
    assert runs[True].summary["final_eval"]["loss"] == pytest.approx(
        runs[False].summary["final_eval"]["loss"], rel=0.05
    )
    weights = load_file(tmp_path / "bf16-True" / "adapter_model.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values())


def test_group_by_length_can_be_turned_off(model_dirs, data_files, tmp_path):
    from lorakit.train.api import build_model, read_examples
    from lorakit.train.trainer import Trainer

    train_file, _ = data_files["causal-lm"]
    spreads = {}
    for grouped in (True, False):
        cfg = TrainConfig(
            model=str(model_dirs["llama"]),
            task="causal-lm",
            data=str(train_file),
            batch_size=4,
            output=str(tmp_path / "out"),
            group_by_length=grouped,
            max_length=32,
        )
        examples = read_examples(cfg.data, cfg, None, "training data")
        examples = [{**e, "response": e["response"] + " a" * (i % 7)} for i, e in enumerate(examples)]  # varied lengths
        model, tok, _ = build_model(cfg, [])
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
        trainer = Trainer(model, make_task("causal-lm", tok, 32), examples, None, cfg, save_adapter=lambda *a: None)
        batches = trainer._epoch_batches(0)
        assert sorted(i for b in batches for i in b) == list(range(len(examples)))  # each example once
        lengths = [[len(trainer.train_encoded[i]) for i in b] for b in batches]
        spreads[grouped] = sum(max(b) - min(b) for b in lengths)
    assert spreads[True] < spreads[False]  # grouping pads less; plain shuffling mixes lengths
