"""Many adapters scored in one pass (mixed batches, the tasks' own evaluation in lockstep)
against each adapter scored on its own."""

from __future__ import annotations

import pytest

from lorakit.train.api import evaluate, evaluate_adapters, load_trained, only

from ..serve.test_engine import make_adapter
from .conftest import copy_rows, sentiment_rows, write_jsonl


def one_by_one(trained, names, data) -> list[dict]:
    """The oracle: each adapter active alone (the base with adapters disabled), the usual path."""
    rows = []
    for name in names:
        with only(trained.model, name):
            rows.append(evaluate(trained, data))
    return rows


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_one_pass_scores_equal_each_adapter_scored_alone(task, model_dirs, tmp_path):
    kind, labels = ("llama", None) if task == "causal-lm" else ("bert", ["neg", "pos"])
    dirs = [make_adapter(model_dirs[kind], tmp_path / name, seed=seed, task=task, labels=labels, r=4)
            for name, seed in (("one", 1), ("two", 2))]  # fmt: skip
    rows = copy_rows(20, 3) if task == "causal-lm" else sentiment_rows(20, 3)
    data = str(write_jsonl(tmp_path / "dev.jsonl", rows))
    trained = load_trained(str(model_dirs[kind]), dirs, task=task)
    names = ["one", "two", None]
    together = evaluate_adapters(trained, names, data, batch_size=8)
    alone = one_by_one(trained, names, data)
    for mine, expected in zip(together, alone):
        assert mine.keys() == expected.keys()
        for key in mine:
            assert mine[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert together[0]["loss"] != pytest.approx(together[1]["loss"], rel=1e-3)  # the adapters differ


def test_cli_scores_several_adapters_and_the_base_in_one_table(model_dirs, tmp_path):
    import json

    from typer.testing import CliRunner

    from lorakit.cli import app

    dirs = [make_adapter(model_dirs["llama"], tmp_path / name, seed=seed, r=4) for name, seed in (("x", 1), ("y", 2))]
    data = str(write_jsonl(tmp_path / "dev.jsonl", copy_rows(12, 3)))
    args = ["eval", "--model", str(model_dirs["llama"]), "--data", data, "--base", "--compare", "--json"]
    for d in dirs:
        args += ["--adapter", str(d)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["scores"]) == [str(dirs[0]), str(dirs[1]), "(base)"]
    assert set(report["seconds"]) == {"one pass", "one run per adapter"}
    alone = load_trained(str(model_dirs["llama"]), dirs[1], task="causal-lm")
    assert report["scores"][str(dirs[1])]["loss"] == pytest.approx(evaluate(alone, data)["loss"], rel=1e-5)
