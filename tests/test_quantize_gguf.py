"""`--quantize gguf`: the frozen base keeps its GGUF file's own blocks. The blocks dequantise
bit for bit as the gguf package does, each layer's weights are bit for bit what transformers
loads from the file, a run trains on them, and PEFT runs the adapter on transformers' load."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
import torch.nn as nn
import transformers as tf

import lorakit
from lorakit.models import gguf_source
from lorakit.quantize import GGUFLinear, QuantizeError, dequantize_blocks, quantize_base
from lorakit.train import TrainConfig, TrainConfigError, train

from .gguf_files import tiny_llama_gguf
from .train.conftest import copy_rows, write_jsonl

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q6_K"])
def test_blocks_dequantise_bit_for_bit_as_the_gguf_package_does(qtype):
    kind = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    if qtype == "Q6_K":  # the gguf package only reads K-quants: random blocks, finite scales
        block, size = gguf.GGML_QUANT_SIZES[kind]
        blocks = rng.integers(0, 256, (6, 2 * size), dtype=np.uint8)
        blocks.reshape(6, 2, size)[..., -2:] = np.array([0.01], np.float16).view(
            np.uint8
        )  # d, the block's last 2 bytes
        cols = 2 * block
    else:
        cols = 96
        blocks = gguf.quants.quantize(rng.standard_normal((6, cols)).astype(np.float32), kind)
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, kind))
    ours = dequantize_blocks(torch.from_numpy(blocks), qtype, cols)
    assert ours.dtype == torch.float32 and ours.shape == (6, cols)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_layers_hold_the_files_blocks_and_equal_what_transformers_loads(tmp_path, qtype):
    path = tiny_llama_gguf(tmp_path, qtype)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    loaded = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert quantize_base(model, "gguf", gguf_file=path) == 14  # 2 blocks x q, k, v, o, gate, up, down
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t.data for t in reader.tensors}
    v_proj = model.model.layers[1].self_attn.v_proj
    assert isinstance(v_proj, GGUFLinear) and v_proj.qtype == qtype and v_proj.weight.dtype == torch.uint8
    assert np.array_equal(v_proj.weight.numpy(), stored["blk.1.attn_v.weight"])  # kept as the file has it
    for name, module in model.named_modules():
        if isinstance(module, GGUFLinear):  # q/k too: their rows follow transformers' un-permuting
            assert torch.equal(module.dense(torch.float32), loaded[name]), name
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    with pytest.raises(QuantizeError, match="was not loaded from one"):
        quantize_base(tf.LlamaForCausalLM(model.config), "gguf")


def test_a_gguf_run_trains_and_peft_runs_its_adapter_on_transformers_load(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    path = tiny_llama_gguf(tmp_path / "model", "Q4_1")
    assert gguf_source(str(path)) == path
    options = dict(model=str(path), task="causal-lm", data=str(write_jsonl(tmp_path / "train.jsonl", copy_rows(48, 0))),
                   output=str(tmp_path / "out"), batch_size=8, lr=1e-2, max_steps=12, rank=4, alpha=8, max_length=32,
                   targets="all-linear", quantize="gguf", eval_before=False)  # fmt: skip
    result = train(TrainConfig(**options), callbacks=[])
    losses = [r["loss"] for r in result.state.history if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    # the oracle: PEFT on the float weights transformers dequantises from the same file
    base = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "out").eval()
    trained = lorakit.train.api.load_trained(None, tmp_path / "out")  # the GGUF base, as trained
    assert isinstance(trained.model.model.layers[0].mlp.down_proj.base_layer, GGUFLinear)
    ids = torch.tensor([[3, 9, 27, 81, 94, 40], [70, 71, 72, 73, 74, 75]])
    with torch.no_grad():
        torch.testing.assert_close(trained.model(input_ids=ids).logits, theirs(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    # merging: ΔW added to the dequantised blocks, exact in fp32; re-making GGUF blocks is llama.cpp's job
    plain, drift = lorakit.train.api.merge_trained(trained)
    assert not any(isinstance(m, GGUFLinear) for m in plain.modules())
    assert drift["merged_drift"] < 1e-5 and "requantised_drift" not in drift


def test_quantize_gguf_on_a_model_without_a_gguf_file_fails_before_loading(tmp_path):
    model_dir = tmp_path / "plain"
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=32)).save_pretrained(model_dir)  # fmt: skip
    with pytest.raises(TrainConfigError, match="--quantize='gguf' is invalid with --model=.*not a .gguf file"):
        TrainConfig(model=str(model_dir), task="causal-lm", data="x.jsonl", output=str(tmp_path / "o"),
                    quantize="gguf")  # fmt: skip
