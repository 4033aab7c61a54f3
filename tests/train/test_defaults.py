"""Default settings: what a user leaves unset is chosen per task and method (train/defaults.py),
what a user gives is kept, and `lorakit train` says what it chose."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.methods import METHODS
from lorakit.train import TrainConfig
from lorakit.train.config import TrainConfigError, read_config_file
from lorakit.train.defaults import LORA_BY_TASK, METHOD_LR, METHOD_LR_BY_TASK, defaults_for
from lorakit.train.tasks import TASKS

from .conftest import copy_rows, model_dirs, write_jsonl  # noqa: F401  (fixture)


@pytest.mark.parametrize("task", TASKS)
def test_unset_lora_settings_take_the_tasks_defaults(task):
    config = TrainConfig(model="m", task=task, data="d")
    expected = LORA_BY_TASK[task]
    assert (config.lr, config.rank, config.alpha, config.targets) == (
        expected["lr"], expected["rank"], expected["alpha"], expected["targets"])  # fmt: skip
    assert config.defaults_chosen["lr"] == expected["lr"]
    assert set(config.defaults_chosen) == {"lr", "rank", "alpha", "targets"}


def test_given_settings_are_kept_and_not_reported_as_chosen():
    config = TrainConfig(model="m", task="causal-lm", data="d", lr=3e-4, rank=4, alpha=4.0, targets="q_proj")
    assert (config.lr, config.rank, config.alpha, config.targets) == (3e-4, 4, 4.0, ["q_proj"])
    assert config.defaults_chosen == {}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_every_other_method_gets_its_own_learning_rate(method):
    config = TrainConfig(model="m", task="classification", data="d", method=method)
    assert config.lr == METHOD_LR[method] == defaults_for("classification", method)["lr"]
    assert config.defaults_chosen == {"lr": METHOD_LR[method]}  # rank/alpha do not apply to it
    assert config.targets is None


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq"])
def test_generation_tasks_take_their_own_grids_learning_rates(task):
    for method, lr in METHOD_LR_BY_TASK[task].items():
        assert lr != METHOD_LR[method]  # an override that changes nothing would not need to exist
        config = TrainConfig(model="m", task=task, data="d", method=method)
        assert config.lr == lr and config.defaults_chosen == {"lr": lr}
    assert TrainConfig(model="m", task=task, data="d", method="full").lr == METHOD_LR["full"]


def test_the_chosen_settings_cannot_be_set_from_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("defaults_chosen: {lr: 1}\n")
    with pytest.raises(TrainConfigError, match="unknown option"):
        read_config_file(path)


def test_lorakit_train_prints_the_settings_it_chose(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(8, 0))
    args = ["train", "--model", model_dirs["llama"], "--task", "causal-lm", "--data", data, "--output",
            tmp_path / "out", "--max-steps", "1", "--batch-size", "4", "--rank", "4", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    lr = LORA_BY_TASK["causal-lm"]["lr"]
    assert f"defaults for lora on causal-lm: alpha {LORA_BY_TASK['causal-lm']['alpha']:g}, lr {lr:g}" in result.output
    assert "rank" not in result.output.split("defaults for")[1].split("\n")[0]  # given, so not a default
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == LORA_BY_TASK["causal-lm"]["alpha"]
