"""Numerics: NaN/inf in the loss or the gradients stops training at that step, naming it and the
last good checkpoint, before the weights change; merging refuses NaN/inf (safe merge) and leaves
the model as it was."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.lora.io import WEIGHTS_NAME
from lorakit.train import TrainConfig, TrainingDiverged, train
from lorakit.train.state import BaseCallback
from tests.conftest import logits, tiny, tiny_inputs
from tests.train.conftest import data_files, model_dirs  # noqa: F401  (fixtures)


class Grab(BaseCallback):
    """Keeps the trainer (via monkeypatch) and, after `step`, makes one parameter's gradient inf."""

    def __init__(self, ref, step):
        self.ref, self.step = ref, step

    def on_log(self, state, record):
        if state.step == self.step:
            trainer = self.ref["trainer"]
            self.ref["before"] = {n: p.detach().clone() for n, p in trainer.params.items()}
            next(iter(trainer.params.values())).register_hook(lambda g: torch.full_like(g, float("inf")))


def test_inf_gradient_stops_before_the_update_naming_step_and_checkpoint(
    model_dirs, data_files, tmp_path, captured_trainer
):
    ref = captured_trainer
    train_file, _ = data_files["classification"]
    cfg = TrainConfig(
        model=str(model_dirs["bert"]),
        data=str(train_file),
        output=str(tmp_path / "out"),
        batch_size=8,
        max_steps=20,
        save_every=5,
        rank=4,
        max_length=32,
        max_grad_norm=1.0,
    )
    with pytest.raises(TrainingDiverged, match=r"gradient norm became (inf|nan) at step 8.*step-0000005.*--resume"):
        train(cfg, callbacks=[Grab(ref, 7)])
    for name, p in ref["trainer"].params.items():  # the bad step did not touch the weights
        assert torch.equal(p, ref["before"][name]), name
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-0000005"]


def adapted(kind="llama", dtype=torch.float32):
    model = tiny(kind).to(dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, init_lora_weights=False))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_(std=0.5)
    return model


def poison_last(model, value=float("nan")):
    *_, (path, layer) = lorakit.lora_layers(model)
    with torch.no_grad():
        layer.lora_A["default"][0, 0] = value
    return path


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_equal(after, before):
    # equal_nan: the poisoned adapter parameter itself holds a NaN
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_merge_refuses_a_broken_adapter_and_rolls_back(value):
    model = adapted()
    path = poison_last(model, value)  # the last layer fails after the others were merged: rollback
    before = weights(model)
    with pytest.raises(
        lorakit.MergeError, match=rf"cannot merge into {path}: .*NaN or infinite weights.*Nothing was merged"
    ):
        lorakit.merge(model)
    assert_bit_equal(weights(model), before)
    assert all(layer.merged_adapters == [] and layer.exact.original is None for _, layer in lorakit.lora_layers(model))


def test_merge_and_unload_refuses_and_keeps_the_adapter():
    model = adapted()
    poison_last(model)
    before = weights(model)
    with pytest.raises(lorakit.MergeError):
        lorakit.merge_and_unload(model)
    assert len(list(lorakit.lora_layers(model))) == 4 and lorakit.adapter_names(model) == ["default"]
    assert_bit_equal(weights(model), before)


def test_merge_refuses_an_overflow_of_the_base_dtype():
    model = adapted(dtype=torch.float16)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_A["default"].fill_(1.0)
            layer.lora_B["default"].fill_(6e4)  # finite in float16, but ΔW = 4·B·A ~ 1e6 exceeds its 65504
    with pytest.raises(lorakit.MergeError, match="overflow"):
        lorakit.merge(model)
    lorakit.merge(model, safe_merge=False)  # the check can be turned off (it is on by default)
    assert any(not torch.isfinite(layer.weight).all() for _, layer in lorakit.lora_layers(model))


def test_safe_merge_still_merges_a_good_adapter_exactly():
    model = adapted()
    inputs = tiny_inputs("llama")
    expected = logits(model, inputs)
    torch.testing.assert_close(logits(lorakit.merge_and_unload(model), inputs), expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_non_finite_head_copy():
    model = tiny("bert")
    lorakit.inject(model, lorakit.LoraConfig(r=4, modules_to_save=["classifier"]))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight[0, 0] = float("inf")
    with pytest.raises(lorakit.MergeError, match="classifier.weight"):
        lorakit.merge_and_unload(model)
    assert lorakit.adapter_names(model) == ["default"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_cli_merge_refuses_a_nan_adapter_with_one_line_and_writes_nothing(tmp_path):
    from .crash_harness import cli, prepare, reference_run, run_forked

    job = prepare(tmp_path / "job")
    adapter, _ = reference_run(job, tmp_path)
    tensors = load_file(str(adapter / WEIGHTS_NAME))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})
    log = tmp_path / "merge.log"
    assert run_forked(cli(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]), log) == 2
    text = log.read_text()
    assert "NaN or infinite" in text and "Traceback" not in text
    assert not (tmp_path / "merged").exists()
