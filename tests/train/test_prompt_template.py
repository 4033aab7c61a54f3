"""`--prompt-template`: each causal-lm prompt placed in the template, then the chat template; saved
with the adapter so eval / predict / generate read what training read; bad templates refused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.models import load_tokenizer
from lorakit.train import TrainConfig
from lorakit.train.api import load_trained
from lorakit.train.batching import IGNORE
from lorakit.train.config import TrainConfigError
from lorakit.train.data import DataError
from lorakit.train.tasks import make_task

from .conftest import copy_rows, model_dirs, write_jsonl  # noqa: F401  (fixture)
from .test_tasks import TEMPLATE, ids


@pytest.fixture
def chat_tokenizer(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["llama"]))
    tokenizer.chat_template = TEMPLATE  # user turns render as "c ...", the assistant's as "d ..."
    return tokenizer


def test_the_prompt_fills_the_template_inside_the_users_turn(chat_tokenizer):
    task = make_task("causal-lm", chat_tokenizer, 64, prompt_template="a b {prompt} b a")
    encoded = task.encode({"prompt": "the film", "response": "good"})
    prompt = ids(chat_tokenizer, "c a b the film b a d ")  # template filled, then the chat template
    answer = ids(chat_tokenizer, "good") + [chat_tokenizer.eos_token_id]
    assert encoded.input_ids == prompt + answer
    assert encoded.labels == [IGNORE] * len(prompt) + answer


def test_braces_other_than_the_slot_are_literal_text(chat_tokenizer):
    task = make_task("causal-lm", chat_tokenizer, 64, prompt_template='{"facts": {prompt}}')
    assert task.prompt_text("x") == chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": '{"facts": x}'}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("template", ["no slot here", "{prompt} twice {prompt}", "{Prompt}"])
def test_a_template_without_exactly_one_slot_is_refused_before_loading(template):
    with pytest.raises(TrainConfigError, match=r"\{prompt\} exactly once"):
        TrainConfig(model="does-not-exist", task="causal-lm", data="x.jsonl", prompt_template=template)


def test_a_template_on_a_task_without_prompts_is_refused():
    with pytest.raises(TrainConfigError, match="prompt-template is invalid with --task=classification"):
        TrainConfig(model="does-not-exist", task="classification", data="x.jsonl", prompt_template="{prompt}")
    with pytest.raises(DataError, match="causal-lm prompts"):
        make_task("ner", None, 16, prompt_template="{prompt}")


def train_cli(model_dir, data, out, *extra: str) -> None:
    args = ["train", "--model", model_dir, "--task", "causal-lm", "--data", data, "--output", out,
            "--max-steps", "2", "--batch-size", "4", "--quiet", *extra]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def test_the_template_is_saved_with_the_adapter_and_generation_reads_it(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(16, 0))
    out = tmp_path / "adapter"
    train_cli(model_dirs["llama"], data, out, "--prompt-template", r"reverse:\n{prompt}")  # a shell's \n
    template = "reverse:\n{prompt}"
    assert json.loads((out / "lorakit_task.json").read_text())["prompt_template"] == template
    trained = load_trained(None, out)
    assert trained.task.prompt_template == template
    # lorakit's greedy output = transformers' greedy decoding of the templated prompt
    tokenizer, prompt = trained.tokenizer, "a b c"
    text = trained.task.prompt_text(prompt)
    assert "reverse:\na b c" in text
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False, return_token_type_ids=False)
    with torch.no_grad():
        out_ids = trained.model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    expected = tokenizer.decode(out_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert trained.task.generate(trained.model, [prompt], max_new_tokens=6) == [expected]


def test_adapters_trained_with_different_templates_are_not_loaded_together(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(16, 0))
    train_cli(model_dirs["llama"], data, tmp_path / "one", "--prompt-template", "one {prompt}")
    train_cli(model_dirs["llama"], data, tmp_path / "two")
    with pytest.raises(ValueError, match="prompt template"):
        load_trained(None, [tmp_path / "one", tmp_path / "two"])
