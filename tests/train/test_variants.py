"""`lorakit train --dora` and `--init pissa|olora` end to end: the saved adapter reproduces the
run's own final eval on the untouched base, and an interrupted run resumes exactly."""

from __future__ import annotations

import pytest

from lorakit.lora import LoraConfig
from lorakit.train import TrainConfig, train
from lorakit.train.api import evaluate, load_trained

from .test_trainer import StopAt, config, losses


@pytest.mark.parametrize(
    "options", [{"use_dora": True}, {"init": "pissa"}, {"init": "olora"}, {"init": "pissa", "use_dora": True}]
)
def test_the_saved_adapter_scores_what_the_run_scored(options, model_dirs, data_files, tmp_path):
    cfg = config(model_dirs, data_files, "causal-lm", tmp_path, targets="all-linear", lr=3e-2, max_steps=12,
                 eval_every=None, **options)  # fmt: skip
    result = train(cfg, callbacks=[])
    final = result.summary["final_eval"]["loss"]
    assert final < result.summary["baseline_eval"]["loss"]
    saved = LoraConfig.from_pretrained(tmp_path / "out")
    assert saved.init_lora_weights is True and saved.use_dora == options.get("use_dora", False)
    assert saved.r == (8 if "init" in options else 4)  # PiSSA/OLoRA: written as plain LoRA, rank doubled
    # loaded on the untouched base (a fresh load), the adapter gives the run's own last eval loss
    assert evaluate(load_trained(None, tmp_path / "out"), str(data_files["causal-lm"][1]))["loss"] == pytest.approx(
        final, rel=1e-4
    )


def test_a_pissa_run_resumes_exactly(model_dirs, data_files, tmp_path):
    """The residual base is rebuilt by the same init on resume; the trained factors come back."""
    kw = dict(init="pissa", targets="all-linear", max_steps=12, eval_every=None, save_every=4, lr=3e-2)
    full = train(config(model_dirs, data_files, "causal-lm", tmp_path / "a", **kw), callbacks=[])
    stopped = train(config(model_dirs, data_files, "causal-lm", tmp_path / "b", **kw), callbacks=[StopAt(6)])
    assert stopped.state.step == 6
    resumed = train(config(model_dirs, data_files, "causal-lm", tmp_path / "b", resume=True, **kw), callbacks=[])
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5, abs=1e-6)


def test_pissa_and_quantize_together_are_refused_before_anything_loads(tmp_path):
    from lorakit.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="--quantize='nf4' is invalid with --init=pissa: pissa replaces"):
        TrainConfig(model="x", data="d.jsonl", task="causal-lm", quantize="nf4", init="pissa")
    with pytest.raises(TrainConfigError, match="--init='svd' is invalid"):
        TrainConfig(model="x", data="d.jsonl", task="causal-lm", init="svd")


def test_experts_named_in_targets_train_and_the_adapter_reproduces_the_run(data_files, tmp_path):
    """--targets takes fused expert weights by their parameter path beside module names."""
    from .conftest import make_model_dir

    model_dir = make_model_dir(tmp_path, "qwen3-moe")
    targets = "q_proj,v_proj,mlp.experts.gate_up_proj,mlp.experts.down_proj"
    cfg = config({"llama": model_dir}, data_files, "causal-lm", tmp_path, targets=targets, lr=3e-2, max_steps=12,
                 eval_every=None)  # fmt: skip
    result = train(cfg, callbacks=[])
    final = result.summary["final_eval"]["loss"]
    assert final < result.summary["baseline_eval"]["loss"]
    saved = LoraConfig.from_pretrained(tmp_path / "out")
    assert saved.target_modules == ["q_proj", "v_proj"]
    assert saved.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    trained = load_trained(None, tmp_path / "out")
    assert evaluate(trained, str(data_files["causal-lm"][1]))["loss"] == pytest.approx(final, rel=1e-4)


def test_expert_targets_are_checked_against_the_model_before_training(data_files, tmp_path):
    from lorakit.train.config import TrainConfigError

    from .conftest import make_model_dir

    dirs = {"llama": make_model_dir(tmp_path, "qwen3-moe")}
    with pytest.raises(TrainConfigError, match=r"--rank=17 is invalid: expected at most 16, the smaller dimension of "
                       r"each expert in model\.layers\.0\.mlp\.experts\.down_proj \(4 x 32 x 16\)"):  # fmt: skip
        train(config(dirs, data_files, "causal-lm", tmp_path, targets="mlp.experts.down_proj", rank=17), callbacks=[])
    with pytest.raises(TrainConfigError, match=r"'experts\.up_proj' matches no module .* expert parameters: "
                       r"mlp\.experts\.down_proj, mlp\.experts\.gate_up_proj"):  # fmt: skip
        train(config(dirs, data_files, "causal-lm", tmp_path, targets="q_proj,experts.up_proj"), callbacks=[])
