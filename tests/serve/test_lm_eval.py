"""lm-evaluation-harness against `lorakit serve` (its `local-completions` model, remote
tokenizer) and against Hugging Face + PEFT in process (`--model hf ... peft=<adapter>`), on
the shipped demo tasks: the same accuracy, and the same loglikelihood for every request."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.data.lm_eval_tasks import write_tasks
from lorakit.models import load_model, load_tokenizer
from lorakit.serve import Engine, EngineConfig

from .test_engine import make_adapter
from .test_server import Server

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'lm-eval[api]'")


def demo_model(directory, data) -> None:
    """A tiny random LLaMA whose word-level tokenizer knows every word of the task data (so
    " negative" and " positive" are different tokens with different loglikelihoods)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    split = pre_tokenizers.Whitespace()
    texts = [f"Review: {r['text']}\nSentiment: {r['label']}" for r in map(json.loads, data.read_text().splitlines())]
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = split
    tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                               eos_token="</s>").save_pretrained(directory)  # fmt: skip
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, initializer_range=0.3, pad_token_id=0,
                            eos_token_id=2, bos_token_id=2)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(directory)


def evaluate(include, tasks, model: str, model_args: str) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(include)), random_seed=0,
                                   numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)  # fmt: skip


def assert_same_results(ours: dict, theirs: dict, tasks) -> None:
    """The same metric, and per request the same loglikelihoods (1e-4) and greedy flags, or
    the same generated text."""
    for task in tasks:
        metric = "acc,none" if task.endswith("mc") else "exact_match,none"
        assert ours["results"][task][metric] == theirs["results"][task][metric]
        for mine, hers in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert mine["doc_id"] == hers["doc_id"]
            if task.endswith("mc"):  # each choice's (loglikelihood, is_greedy)
                for (ll, greedy), (ll2, greedy2) in zip([r[0] for r in mine["resps"]], [r[0] for r in hers["resps"]]):
                    assert ll == pytest.approx(ll2, abs=1e-4) and greedy == greedy2
            else:  # the generated text
                assert mine["resps"] == hers["resps"]


def test_lm_eval_through_the_server_equals_hf_with_peft(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_tasks(tmp_path / "tasks", limit=6)
    model_dir, adapters = tmp_path / "model", tmp_path / "adapters"
    demo_model(model_dir, tmp_path / "tasks" / "lorakit_demo.jsonl")
    for name, seed in (("a", 1), ("b", 2)):  # two adapters loaded: requests for "a" share batches with "b"
        make_adapter(model_dir, adapters / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"])
    engine = Engine(load_model(str(model_dir), "AutoModelForCausalLM").model, load_tokenizer(str(model_dir)),
                    "causal-lm", adapters, name="demo", config=EngineConfig(watch_interval_s=0))  # fmt: skip
    with Server(engine) as server:
        url = f"{server.url}/v1/completions"
        ours = evaluate(tmp_path / "tasks", tasks, "local-completions", f"model=a,base_url={url}")
    theirs = evaluate(tmp_path / "tasks", tasks, "hf", f"pretrained={model_dir},peft={adapters / 'a'},device=cpu")
    first = [r[0][0] for r in ours["samples"][tasks[0]][0]["resps"]]
    assert len(first) == 2 and first[0] != first[1]  # the two choices score differently: a test that can fail
    assert any(s["resps"][0][0].strip() for s in ours["samples"][tasks[1]])  # and text was generated
    assert_same_results(ours, theirs, tasks)


def test_harness_in_process_for_two_adapters_equals_hf_with_peft(tmp_path, monkeypatch):
    """`lorakit eval --harness`: both adapters in one pass, each equal to lm-eval's own hf+peft."""
    from lorakit.train.api import load_trained
    from lorakit.train.harness import run_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_tasks(tmp_path / "tasks", limit=6)
    model_dir, adapters = tmp_path / "model", tmp_path / "adapters"
    demo_model(model_dir, tmp_path / "tasks" / "lorakit_demo.jsonl")
    dirs = [make_adapter(model_dir, adapters / n, seed=s, r=4, target_modules=["q_proj", "v_proj"])
            for n, s in (("a", 1), ("b", 2))]  # fmt: skip
    trained = load_trained(str(model_dir), dirs, task="causal-lm")
    ours = run_harness(trained.model, trained.tokenizer, ["a", "b"], tasks, include_path=str(tmp_path / "tasks"))
    for mine, adapter in zip(ours, dirs):
        theirs = evaluate(tmp_path / "tasks", tasks, "hf", f"pretrained={model_dir},peft={adapter},device=cpu")
        assert_same_results(mine, theirs, tasks)
    first = [r[0][0] for r in ours[0]["samples"][tasks[0]][0]["resps"]]
    other = [r[0][0] for r in ours[1]["samples"][tasks[0]][0]["resps"]]
    assert first != other  # the two adapters answer differently


def test_lorakit_eval_harness_prints_one_row_per_adapter(tmp_path, monkeypatch):
    import json as json_

    from typer.testing import CliRunner

    from lorakit.cli import app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path / "tasks", limit=4)
    model_dir = tmp_path / "model"
    demo_model(model_dir, tmp_path / "tasks" / "lorakit_demo.jsonl")
    dirs = [make_adapter(model_dir, tmp_path / n, seed=s, r=4) for n, s in (("a", 1), ("b", 2))]
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--adapter",
        str(dirs[0]),
        "--adapter",
        str(dirs[1]),
        "--base",
        "--harness",
        "lorakit_demo_mc",
        "--include-path",
        str(tmp_path / "tasks"),
        "--task",
        "causal-lm",
        "--json",
    ]
    result = CliRunner().invoke(app, args)  # fmt: skip
    assert result.exit_code == 0, result.output
    table = json_.loads(result.stdout.strip().splitlines()[-1])
    assert list(table) == [str(dirs[0]), str(dirs[1]), "(base)"]
    assert all(0 <= row["lorakit_demo_mc acc"] <= 1 for row in table.values())
