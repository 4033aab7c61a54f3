"""Validation before compute: every bad option fails before the first training step with a
message naming the option, the bad value and the fix. docs/validation.md lists each check and
the test here that fires it."""

from __future__ import annotations

import json

import pytest

from lorakit.train import TrainConfig, train
from lorakit.train.config import TrainConfigError
from lorakit.train.data import DataError
from tests.train.conftest import data_files, model_dirs  # noqa: F401  (fixtures)

# (options, the message must contain: field=value ... the fix)
CONFIG_CHECKS = {
    "rank_zero": ({"rank": 0}, "--rank=0 is invalid: expected a positive integer"),
    "rank_negative": ({"rank": -4}, "--rank=-4 is invalid: expected a positive integer"),
    "alpha_zero": ({"alpha": 0}, "--alpha=0 is invalid: expected a positive number"),
    "dropout_one": ({"dropout": 1.0}, "--dropout=1.0 is invalid: expected a probability in [0, 1)"),
    "dropout_negative": ({"dropout": -0.1}, "--dropout=-0.1 is invalid: expected a probability in [0, 1)"),
    "unknown_task": ({"task": "translation"}, "--task='translation' is invalid: expected one of classification"),
    "unknown_method": ({"method": "dora"}, "--method='dora' is invalid: expected one of lora"),
    "unknown_attention": ({"attention": "fast"}, "--attention='fast' is invalid: expected one of eager"),
    "unknown_device": ({"device": "gpu"}, "--device='gpu' is invalid: expected cpu, cuda or cuda:N"),
    "no_data": ({"data": ""}, "--data='' is invalid: expected a training data file"),
    "lr": ({"lr": 5.0}, "--lr=5.0 is invalid: expected a learning rate in (0, 1)"),
    "head_lr": ({"head_lr": -1.0}, "--head-lr=-1.0 is invalid: expected a learning rate in (0, 1)"),
    "bad_regex_targets": ({"targets": "query("}, "--targets='query(' is invalid: not a regular expression"),
    "generate_for_classification": ({"eval_generate": 4}, "--eval-generate=4 is invalid with --task=classification"),
    "eval_every_without_eval_data": ({"eval_every": 10}, "--eval-every=10 is invalid without --eval-data"),
    "targets_with_full": (
        {"method": "full", "targets": "query"},
        "--targets=['query'] is invalid with --method=full: it is a LoRA option",
    ),
    "rslora_with_bitfit": (
        {"method": "bitfit", "use_rslora": True},
        "--use-rslora=True is invalid with --method=bitfit",
    ),
    "dora_with_full": ({"method": "full", "use_dora": True}, "--use-dora=True is invalid with --method=full"),
    "init_with_bitfit": ({"method": "bitfit", "init": "pissa"}, "--init='pissa' is invalid with --method=bitfit"),
    "add_tokens_with_full": (
        {"method": "full", "add_tokens": "<tool>"},
        "--add-tokens=['<tool>'] is invalid with --method=full",
    ),
    "lora_plus_with_full": (
        {"method": "full", "lora_plus_ratio": 16},
        "--lora-plus-ratio=16 is invalid with --method=full",
    ),
    "checkpointing_with_prefix": (
        {"method": "prefix-embed", "task": "causal-lm", "gradient_checkpointing": True},
        "--gradient-checkpointing is invalid with --method=prefix-embed",
    ),
    "keep_checkpoints_zero": ({"keep_checkpoints": 0}, "--keep-checkpoints=0 is invalid: expected a positive integer"),
}


@pytest.mark.parametrize("name", list(CONFIG_CHECKS))
def test_config_check(name):
    options, message = CONFIG_CHECKS[name]
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(**{"data": "train.jsonl", **options})
    assert message in str(e.value)


class NoTraining:
    """Stands in for the Trainer: a check that lets the run reach it has fired too late."""

    def __init__(self, *a, **k):
        raise AssertionError("validation let the run reach the trainer")


@pytest.fixture
def no_training(monkeypatch):
    import lorakit.train.api as api

    monkeypatch.setattr(api, "Trainer", NoTraining)


def run(model_dirs, data_files, tmp_path, **options):
    train_file, _ = data_files["classification"]
    base = dict(model=str(model_dirs["bert"]), data=str(train_file), output=str(tmp_path / "out"), max_length=32)
    return train(TrainConfig(**{**base, **options}), callbacks=[])


def test_rank_larger_than_the_layer(model_dirs, data_files, tmp_path, no_training):
    with pytest.raises(
        TrainConfigError,
        match=r"--rank=64 is invalid: expected at most 32, the smaller dimension "
        r"of the targeted layer .*query \(32 x 32\); lower --rank",
    ):
        run(model_dirs, data_files, tmp_path, rank=64)


def test_dora_on_an_embedding(model_dirs, data_files, tmp_path, no_training):
    message = r"--dora is invalid with --targets=\['query', 'word_embeddings'\]: DoRA is implemented for linear layers"
    with pytest.raises(TrainConfigError, match=message + r", and .*word_embeddings is of type Embedding"):
        run(model_dirs, data_files, tmp_path, targets="query,word_embeddings", use_dora=True)


def test_unknown_target_name(model_dirs, data_files, tmp_path, no_training):
    # "qkv" matches nothing; "query" alone would have hidden it (PEFT errs only when nothing matches).
    with pytest.raises(
        TrainConfigError,
        match=r"--targets='query,qkv' is invalid: 'qkv' matches no module of this "
        r"Bert\w+; candidate module names: .*value",
    ):
        run(model_dirs, data_files, tmp_path, targets="query,qkv")


def test_target_regex_matching_nothing(model_dirs, data_files, tmp_path, no_training):
    with pytest.raises(TrainConfigError, match=r"--targets='.\*nothing.\*' is invalid: .*matched no module"):
        run(model_dirs, data_files, tmp_path, targets=".*nothing.*")


def test_missing_data_field(model_dirs, tmp_path, no_training):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"blurb": "good", "label": "pos"}) + "\n")
    with pytest.raises(DataError, match="--text-field"):
        train(TrainConfig(model=str(model_dirs["bert"]), data=str(bad), output=str(tmp_path / "out")), callbacks=[])


def test_output_dir_is_a_file(model_dirs, data_files, tmp_path, no_training):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(TrainConfigError, match=r"--output='.*taken' is invalid: it is a file"):
        run(model_dirs, data_files, tmp_path, output=str(tmp_path / "taken"))


def test_output_dir_not_writable(model_dirs, data_files, tmp_path, no_training):
    (tmp_path / "file").write_text("x")  # a directory cannot be made under a file, even by root
    with pytest.raises(
        TrainConfigError, match=r"--output='.*file/out' is invalid: it is not writable.*choose a directory"
    ):
        run(model_dirs, data_files, tmp_path, output=str(tmp_path / "file" / "out"))


def test_not_enough_disk_for_checkpoints(model_dirs, data_files, tmp_path, no_training, monkeypatch):
    import shutil

    from lorakit.train import preflight

    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: real._replace(free=10_000))
    with pytest.raises(
        TrainConfigError,
        match=r"--keep-checkpoints=3 is invalid: the checkpoints need about .* MB "
        r"\(3 kept \+ 1 being written.*only 0.0 MB is free.*lower --keep-checkpoints",
    ):
        run(model_dirs, data_files, tmp_path, keep_checkpoints=3)


def test_checkpoint_size_estimate_is_not_below_the_real_size(model_dirs, data_files, tmp_path):
    """The disk check's estimate, against the bytes a real checkpoint takes."""
    from lorakit.train import preflight

    seen = {}
    original = preflight.check_disk_space

    def spy(config, model):
        seen["estimate"] = preflight.checkpoint_bytes(model, config.max_steps)
        return original(config, model)

    import lorakit.train.api as api

    api.preflight.check_disk_space = spy
    try:
        run(model_dirs, data_files, tmp_path, max_steps=2, save_every=1)
    finally:
        api.preflight.check_disk_space = original
    step = tmp_path / "out" / "checkpoints" / "step-0000002"
    real = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
    assert real <= seen["estimate"] <= 2 * real + 100_000, (real, seen["estimate"])


def test_cli_prints_a_model_dependent_error_as_one_red_line(model_dirs, data_files, tmp_path):
    from tests.test_cli import run_cli

    result = run_cli(
        "train",
        "--model",
        model_dirs["bert"],
        "--data",
        data_files["classification"][0],
        "--output",
        tmp_path / "o",
        "--rank",
        "64",
        "--quiet",
    )
    assert result.returncode == 2
    assert "--rank=64 is invalid" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_without_a_gpu(no_training, data_files, tmp_path):  # noqa: F811
    train_file, _ = data_files["classification"]
    with pytest.raises(
        TrainConfigError, match=r"--device='cuda' is invalid: this machine has no CUDA GPU .*use --device=cpu"
    ):
        train(TrainConfig(model="does-not-matter", data=str(train_file), output=str(tmp_path / "out"), device="cuda"))
