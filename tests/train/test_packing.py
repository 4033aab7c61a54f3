"""Padding-free (packed) causal-LM batches give the padded batch's loss and gradients, the
probe refuses models where they would not, and a packed training run equals a padded one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train import TrainConfig, packing, train
from lorakit.train.batching import IGNORE, PACK_FROM_PADDING, Encoded, pack, padding_share
from lorakit.train.packing import packing_support, use_packed_attention
from lorakit.train.tasks import make_task

from .test_fast_paths import ROWS, tiny


def test_pack_lays_examples_end_to_end_with_restarting_positions():
    batch = pack([Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8, 9], [8, 9])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # Each example's first label is dropped: the previous example must not predict it.
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3


def test_only_batches_with_enough_padding_are_packed(tmp_path):
    _, tok = tiny(tmp_path, "llama")
    task = make_task("causal-lm", tok, 32)
    even = [Encoded([5, 6, 7, 8], [IGNORE, 6, 7, 8])] * 3  # no padding to save
    uneven = [Encoded([5, 6, 7, 8, 9, 10], [IGNORE] * 6), Encoded([5, 6], [IGNORE, 6])]
    assert padding_share(even) == 0 and padding_share(uneven) >= PACK_FROM_PADDING
    assert task.collate(even, packed=True)["input_ids"].shape == (3, 4)
    assert "attention_mask" in task.collate(even, packed=True)
    assert task.collate(uneven, packed=True)["input_ids"].shape == (1, 8)
    assert "cu_seq_lens_q" in task.collate(uneven, packed=True)
    assert task.collate(uneven)["input_ids"].shape == (2, 6)  # not asked: padded


def _loss_and_grads(model, task, batch):
    model.zero_grad()
    loss = task.loss_sum(model(**task.model_inputs(batch, model)), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_batch_has_the_padded_batch_s_loss_and_gradients(tmp_path, kind, kernel):
    model, tok = tiny(tmp_path, kind)
    model.set_attn_implementation(kernel)
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    )
    for p in model.parameters():  # B != 0, so the adapter is part of the computation
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    task = make_task("causal-lm", tok, 32)
    encoded = task.encode_all(ROWS)
    padded_loss, padded_grads = _loss_and_grads(model, task, task.collate(encoded))  # the oracle

    assert packing_support(model) is None
    use_packed_attention(model, True)
    batch = task.collate(encoded, packed=True)
    assert batch["input_ids"].shape == (1, sum(len(e) for e in encoded))  # no padding at all
    packed_loss, packed_grads = _loss_and_grads(model, task, batch)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Evaluation during a packed run (padded batches through the packed kernel's fallback)
    # reports the same mean loss as after it.
    packed_eval = task.eval_loss(model, ROWS, batch_size=2)
    use_packed_attention(model, False)
    assert model.config._attn_implementation == kernel
    assert packed_eval == pytest.approx(task.eval_loss(model, ROWS, batch_size=2), rel=1e-5)


def test_unpacked_calls_still_work_under_the_packed_attention(tmp_path):
    """Generation and padded batches go to the wrapped kernel: same outputs as before."""
    model, tok = tiny(tmp_path, "llama")
    task = make_task("causal-lm", tok, 32)
    before = task.generate(model, ["a b", "c d a b c"], max_new_tokens=5)
    use_packed_attention(model, True)
    assert model.config._attn_implementation.startswith(packing.PACKED)
    assert task.generate(model, ["a b", "c d a b c"], max_new_tokens=5) == before


def test_probe_refuses_attention_that_leaks_across_examples(tmp_path, monkeypatch):
    model, _ = tiny(tmp_path, "llama")
    model.set_attn_implementation("eager")

    def leaky(module, q, k, v, scaling, groups, dropout):
        """Causal attention over the whole packed row: example 2 sees example 1."""
        rows, heads, width, dim = q.shape
        joined = [x.transpose(0, 1).reshape(1, x.shape[1], rows * width, dim) for x in (q, k, v)]
        out = packing.causal_attention(*joined, scaling, groups)  # (1, rows*width, H, D)
        return out.reshape(rows, width, heads, dim)

    monkeypatch.setitem(packing.KERNELS, "eager", leaky)
    assert "differ" in packing_support(model)
    assert model.config._attn_implementation == "eager"  # the probe leaves the model as it was


def test_probe_refuses_short_sliding_windows_and_non_transformers_models(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=8,
    )
    model = MistralForCausalLM(config)
    assert "sliding" in packing_support(model, max_length=32)
    assert packing_support(model, max_length=8) is None  # the window never binds: packing is exact
    assert packing_support(torch.nn.Linear(2, 2)).startswith("not a transformers model")


def test_packed_training_keeps_attention_dropout(tmp_path):
    """GPT-2 checkpoints train with attention dropout (attn_pdrop 0.1): packed rows apply it too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=64,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=32,
            attn_pdrop=0.5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        )
    )
    model.set_attn_implementation("eager")
    assert packing_support(model) is None
    use_packed_attention(model, True)
    batch = pack([Encoded(list(range(1, 9)), [IGNORE] * 8), Encoded(list(range(3, 9)), [IGNORE] * 6)])
    del batch["labels"]
    model.train()
    torch.manual_seed(0)
    first = model(**batch).logits
    second = model(**batch).logits
    assert not torch.allclose(first, second)  # dropout masks differ between calls
    model.eval()
    torch.testing.assert_close(model(**batch).logits, model(**batch).logits)


def test_prefix_methods_train_padded(tmp_path):
    from lorakit import methods

    model, _ = tiny(tmp_path, "llama")
    for name in ("prefix-embed", "prefix-layer"):
        wrapped = methods.build(model, name, {"prefix_length": 2, "task": "causal-lm"})
        assert packing_support(wrapped) == "not a transformers model (or one wrapped, e.g. by a prefix method)", name


def test_packed_training_run_equals_the_padded_run(model_dirs, data_files, tmp_path):
    train_file, dev_file = data_files["causal-lm"]
    options = dict(
        model=str(model_dirs["llama"]),
        task="causal-lm",
        data=str(train_file),
        eval_data=str(dev_file),
        batch_size=4,
        lr=1e-2,
        max_steps=6,
        rank=4,
        alpha=8,
        max_length=32,
        group_by_length=False,
        targets=["q_proj", "v_proj"],
        eval_before=False,
    )
    runs = {
        p: train(TrainConfig(output=str(tmp_path / f"packing-{p}"), packing=p, **options), callbacks=[])
        for p in (True, False)
    }
    assert runs[True].summary["packing"] == "on" and runs[False].summary["packing"] == "off: --no-packing"
    adapters = {p: load_file(tmp_path / f"packing-{p}" / "adapter_model.safetensors") for p in runs}
    for name, weight in adapters[False].items():
        torch.testing.assert_close(adapters[True][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert runs[True].summary["final_eval"]["loss"] == pytest.approx(
        runs[False].summary["final_eval"]["loss"], rel=1e-5
    )
