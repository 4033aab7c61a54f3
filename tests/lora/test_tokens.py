"""New tokens: trainable embedding rows (PEFT's trainable_token_indices) against PEFT 0.21 on
tied and untied LLaMA heads: the same outputs and gradients, PEFT's keys, exact merge."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as tf

import lorakit
from lorakit.lora import read_adapter_weights
from lorakit.lora.tokens import TrainableTokens
from tests.conftest import assert_mixed_equals_alone

NEW = [60, 61, 63]  # as if a tokenizer had just added three special tokens


def llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                            initializer_range=0.3)  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def ids() -> torch.Tensor:
    x = torch.randint(2, 60, (3, 8), generator=torch.Generator().manual_seed(1))
    x[:, 2], x[0, 5], x[1, 6] = 60, 61, 63  # the new tokens appear in the input
    return x


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def perturb(model) -> None:
    """The same change in lorakit's and PEFT's models, whatever order their parameters come in."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            wave = torch.sin(torch.arange(p.numel(), dtype=p.dtype) * 0.37).view_as(p)
            if "trainable_tokens_delta" in name:  # rows start as the table's: move them
                p.add_(wave)
            elif "lora_" in name:  # A starts random: set it
                p.copy_(wave)


@pytest.mark.parametrize("tied", [True, False])
def test_lorakit_token_rows_load_in_peft_with_the_same_outputs(tied, tmp_path):
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=NEW)
    model = lorakit.inject(llama(tied), config)
    perturb(model)
    expected = logits(model)
    lorakit.save_adapter(model, tmp_path)
    saved = read_adapter_weights(tmp_path)
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.shape == (3, 16) and len(saved) == 5  # the rows alone, not the [64, 16] table
    theirs = peft.PeftModel.from_pretrained(llama(tied), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(model.lm_head, TrainableTokens) == tied  # a tied head reads the same rows


@pytest.mark.parametrize("tied", [True, False])
def test_peft_token_rows_load_in_lorakit_with_the_same_outputs(tied, tmp_path):
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=NEW)
    theirs = peft.get_peft_model(llama(tied), config).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(llama(tied), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_an_untied_head_trains_its_own_rows_when_named(tmp_path):
    spec = {"embed_tokens": NEW, "lm_head": NEW}
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=spec)
    theirs = peft.get_peft_model(llama(False), config).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(llama(False), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert {k.rsplit(".", 2)[0] for k in read_adapter_weights(tmp_path) if "token" in k} == {
        "base_model.model.model.embed_tokens", "base_model.model.lm_head"}  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_gradients_reach_only_the_new_rows_and_equal_peft(tied):
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=NEW)
    ours = lorakit.inject(llama(tied), lorakit.LoraConfig(**config)).train()
    theirs = peft.get_peft_model(llama(tied), peft.LoraConfig(**config)).train()
    for model in (ours, theirs):
        perturb(model)
        model(ids(), labels=ids()).loss.backward()
    ours_rows = ours.model.embed_tokens.trainable_tokens_delta["default"]
    theirs_rows = theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    torch.testing.assert_close(ours_rows.grad, theirs_rows.grad, rtol=1e-4, atol=1e-6)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert sum("trainable_tokens_delta" in n for n in trainable) == 1
    assert not ours.model.embed_tokens.base_layer.weight.requires_grad
    count = lorakit.count_parameters(ours)
    assert count.trainable == theirs.get_nb_trainable_parameters()[0]


def test_merge_writes_the_rows_and_unmerge_restores_the_table():
    model = lorakit.inject(llama(True), lorakit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=NEW))
    perturb(model)
    table = model.model.embed_tokens.base_layer.weight.clone()
    expected = logits(model)
    lorakit.merge(model)  # (the head's new logits then come from one matmul, not two: round-off)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-4)
    lorakit.unmerge(model)
    assert torch.equal(model.model.embed_tokens.base_layer.weight, table)
    plain = lorakit.merge_and_unload(model)
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    torch.testing.assert_close(logits(plain), expected, rtol=1e-4, atol=1e-4)


def test_mixed_batch_with_and_without_the_new_rows():
    model = llama(True)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=NEW), "tok")
    perturb(model)
    assert_mixed_equals_alone(model, ["tok", None, "tok"], logits)


def test_token_ids_outside_the_table_are_refused_with_the_fix():
    model = llama(True)
    with pytest.raises(ValueError, match=r"\[64\] are outside the table of 64 tokens; resize the model's embeddings"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[64]))
    assert type(model.model.embed_tokens) is torch.nn.Embedding and not list(lorakit.lora_layers(model))
    with pytest.raises(lorakit.ConfigError, match="trainable_token_indices"):
        lorakit.LoraConfig(trainable_token_indices=[-1])
