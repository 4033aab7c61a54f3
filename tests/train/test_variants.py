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


def test_new_tokens_train_their_rows_alone_and_load_with_their_tokenizer(model_dirs, tmp_path):
    """--add-tokens: the tokenizer grows (saved beside the adapter), the untied head's new rows
    train too, only the rows are saved, and the loaded adapter scores what the run scored."""
    from lorakit.inspect_adapter import describe
    from lorakit.lora import read_adapter_weights

    from .conftest import write_jsonl

    rows = [{"prompt": f"a {w}", "response": f"<tool> {w} <sep> b"} for w in ("c", "d", "a", "b") * 12]
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    cfg = TrainConfig(model=str(model_dirs["llama"]), task="causal-lm", data=str(data), eval_data=str(data),
                      output=str(tmp_path / "out"), add_tokens="<tool>,<sep>", max_steps=12, batch_size=8, lr=3e-2,
                      rank=4, alpha=8, max_length=32, targets="q_proj,v_proj")  # fmt: skip
    result = train(cfg, callbacks=[])
    final = result.summary["final_eval"]["loss"]
    assert final < result.summary["baseline_eval"]["loss"]
    saved = read_adapter_weights(tmp_path / "out")
    token_keys = sorted(k for k in saved if "trainable_tokens" in k)
    assert token_keys == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta",
                          "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]  # fmt: skip
    assert all(saved[k].shape == (2, 32) for k in token_keys)  # two rows each, not the whole table
    trained = load_trained(None, tmp_path / "out")
    assert trained.tokenizer.convert_tokens_to_ids(["<tool>", "<sep>"]) == [len(trained.tokenizer) - 2,
                                                                            len(trained.tokenizer) - 1]  # fmt: skip
    assert evaluate(trained, str(data))["loss"] == pytest.approx(final, rel=1e-4)
    info = describe(tmp_path / "out")
    assert info["new token rows"].startswith("2 tokens (") and "model.embed_tokens" in info["new token rows"]
    assert info["vLLM"].startswith("no: vLLM does not load trained token rows")
