"""The trainer end to end on tiny local models: every task learns, resume is exact,
Ctrl-C and NaN are handled, the output dir is a loadable adapter dir."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train import TrainConfig, TrainingDiverged, train
from lorakit.train.state import BaseCallback

from .conftest import MODEL_FOR_TASK


def config(model_dirs, data_files, task, tmp_path, **kw) -> TrainConfig:
    train_file, dev_file = data_files[task]
    options = dict(
        model=str(model_dirs[MODEL_FOR_TASK[task]]),
        task=task,
        data=str(train_file),
        eval_data=str(dev_file),
        output=str(tmp_path / "out"),
        batch_size=8,
        lr=1e-2,
        max_steps=30,
        rank=4,
        alpha=8,
        eval_every=10,
        warmup_ratio=0.0,
        max_length=32,
        scheduler="constant",
    )
    return TrainConfig(**{**options, **kw})


def losses(result) -> list[float]:
    return [r["loss"] for r in result.state.history if "loss" in r]


@pytest.mark.parametrize("task,lr", [("classification", 1e-2), ("ner", 1e-2), ("causal-lm", 3e-2), ("seq2seq", 3e-2)])
def test_each_task_trains_and_its_loss_falls(task, lr, model_dirs, data_files, tmp_path):
    cfg = config(model_dirs, data_files, task, tmp_path, targets="all-linear", lr=lr)
    result = train(cfg, callbacks=[])
    curve = losses(result)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:3]) / 3, curve
    before, after = result.summary["baseline_eval"], result.summary["final_eval"]
    assert after["loss"] < before["loss"]
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "lorakit_task.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_classification_scores_rise(model_dirs, data_files, tmp_path):
    result = train(config(model_dirs, data_files, "classification", tmp_path, max_steps=40), callbacks=[])
    assert result.summary["baseline_eval"]["accuracy"] < 80 and result.summary["final_eval"]["accuracy"] == 100


class StopAt(BaseCallback):
    """Simulates Ctrl-C after a given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, state, record) -> None:
        if state.step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_resume_equals_an_uninterrupted_run(model_dirs, data_files, tmp_path, device):
    """With dropout: the checkpoint restores every RNG a step draws from (on a GPU, the
    device's own generator too), so the resumed run is the uninterrupted one."""
    kw = dict(dropout=0.1, max_steps=24, eval_every=None, save_every=8, grad_accum=2, batch_size=4, device=device)
    full = train(config(model_dirs, data_files, "classification", tmp_path / "a", **kw), callbacks=[])
    cfg = config(model_dirs, data_files, "classification", tmp_path / "b", **kw)
    stopped = train(cfg, callbacks=[StopAt(13)])
    assert stopped.summary["interrupted"] and stopped.state.step == 13
    resumed = train(config(model_dirs, data_files, "classification", tmp_path / "b", resume=True, **kw), callbacks=[])
    assert resumed.state.step == 24
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "a" / "out" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_ctrl_c_saves_a_loadable_checkpoint(model_dirs, data_files, tmp_path):
    result = train(config(model_dirs, data_files, "classification", tmp_path), callbacks=[StopAt(5)])
    assert result.summary["interrupted"]
    checkpoint = tmp_path / "out" / "checkpoints" / "step-0000005"
    assert (checkpoint / "trainer_state.json").is_file()
    from lorakit.models import load_model

    base = load_model(str(model_dirs["bert"]), "AutoModelForSequenceClassification", label_names=["neg", "pos"]).model
    lorakit.load_adapter(base, checkpoint / "adapter")
    assert lorakit.adapter_names(base) == ["default"]


class PoisonAt(BaseCallback):
    def __init__(self, model_ref, step):
        self.model_ref, self.step = model_ref, step

    def on_log(self, state, record):
        if state.step == self.step:
            with torch.no_grad():
                for p in self.model_ref["trainer"].params.values():
                    p.fill_(float("nan"))


def test_nan_loss_stops_with_the_last_good_checkpoint(model_dirs, data_files, tmp_path, captured_trainer):
    ref = captured_trainer
    cfg = config(model_dirs, data_files, "classification", tmp_path, save_every=5, eval_every=None)
    with pytest.raises(TrainingDiverged, match=r"at step 8.*step-0000005.*--resume"):
        train(cfg, callbacks=[PoisonAt(ref, 7)])
    good = load_file(tmp_path / "out" / "checkpoints" / "step-0000005" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())


def test_best_adapter_is_kept_in_the_output_dir(model_dirs, data_files, tmp_path):
    from lorakit.train.api import evaluate, load_trained

    cfg = config(model_dirs, data_files, "classification", tmp_path, max_steps=20, eval_every=5)
    result = train(cfg, callbacks=[])
    best_step = result.state.best_step
    evals = {r["step"]: r["eval_accuracy"] for r in result.state.history if "eval_accuracy" in r}
    assert result.state.best_metric == max(evals.values()) and evals[best_step] == result.state.best_metric
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert len(checkpoints) <= 2 and checkpoints[-1] == "step-0000020"  # keep_checkpoints=2
    # The adapter left in the output dir is the best one: it scores the best step's accuracy.
    kept = evaluate(load_trained(None, tmp_path / "out"), cfg.eval_data)
    assert kept["accuracy"] == pytest.approx(result.state.best_metric)
    if best_step != 20:
        last = load_file(tmp_path / "out" / "checkpoints" / "step-0000020" / "adapter" / "adapter_model.safetensors")
        saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
        assert any(not torch.equal(saved[k], last[k]) for k in saved)


def test_lora_plus_gives_B_a_larger_learning_rate(model_dirs, data_files, tmp_path):
    from lorakit.methods import lora_config
    from lorakit.train.api import build_model
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import Trainer

    cfg = config(model_dirs, data_files, "classification", tmp_path, lora_plus_ratio=16)
    model, tok, new = build_model(cfg, ["neg", "pos"])
    lorakit.inject(model, lora_config(cfg, new))
    trainer = Trainer(
        model,
        make_task("classification", tok, 32, ["neg", "pos"]),
        [{"text": "good", "label": "pos"}],
        None,
        cfg,
        save_adapter=lambda m, p: None,
    )
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["lora_B"] == pytest.approx(16 * lrs["default"]) and lrs["head"] == pytest.approx(lrs["default"])


@pytest.mark.parametrize("method", ["lora", "bitfit", "adapter-h", "full"])
def test_head_lr_reaches_the_new_head_under_every_method(method, model_dirs, data_files, tmp_path):
    from lorakit import methods
    from lorakit.train.api import build_model
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import Trainer

    cfg = config(model_dirs, data_files, "classification", tmp_path, method=method, head_lr=5e-2)
    model, tok, new = build_model(cfg, ["neg", "pos"])
    model = methods.apply_method(model, cfg, new)
    trainer = Trainer(
        model,
        make_task("classification", tok, 32, ["neg", "pos"]),
        [{"text": "good", "label": "pos"}],
        None,
        cfg,
        save_adapter=lambda m, p: None,
    )
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    head = {id(p) for name, p in model.named_parameters() if p.requires_grad and "classifier" in name}
    assert head and {id(p) for p in groups["head"]["params"]} == head
    assert groups["head"]["lr"] == pytest.approx(5e-2) and groups["default"]["lr"] == pytest.approx(1e-2)


def test_bf16_autocast_trains(model_dirs, data_files, tmp_path):
    result = train(config(model_dirs, data_files, "classification", tmp_path, max_steps=40, bf16=True), callbacks=[])
    curve = losses(result)
    assert all(v == v for v in curve) and sum(curve[-5:]) / 5 < 0.8 * sum(curve[:3]) / 3, curve


def test_gradient_checkpointing_equals_the_run_without_it(model_dirs, data_files, tmp_path):
    """Recomputing activations in backward changes memory, not the numbers (dropout included:
    the recomputation replays the RNG state)."""
    runs = {}
    for ckpt in (False, True):
        out = tmp_path / str(ckpt)
        cfg = config(model_dirs, data_files, "classification", out, max_steps=12, dropout=0.1,
                     gradient_checkpointing=ckpt)  # fmt: skip
        runs[ckpt] = (losses(train(cfg, callbacks=[])), load_file(out / "out" / "adapter_model.safetensors"))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5, abs=1e-6)
    for key, tensor in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], tensor, rtol=1e-5, atol=1e-6)


def test_overlong_sequences_are_truncated_and_counted(model_dirs, data_files, tmp_path):
    result = train(config(model_dirs, data_files, "classification", tmp_path, max_length=4, max_steps=2), callbacks=[])
    assert result.summary["truncated"] == 64  # every "[CLS] the x was very y [SEP]" is longer than 4


def test_empty_training_file_is_refused(model_dirs, data_files, tmp_path):
    from lorakit.train.data import DataError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        train(config(model_dirs, data_files, "classification", tmp_path, data=str(empty)), callbacks=[])
