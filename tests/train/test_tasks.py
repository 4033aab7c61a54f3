"""The tasks where no other test looks: seq2seq generation, prediction and BLEU/ROUGE-L
against the libraries that define them, chat templates in training, an adapter saved
without a task, and the shard/gather order of distributed evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU

import lorakit
from lorakit.models import load_model, load_tokenizer
from lorakit.train.batching import IGNORE
from lorakit.train.distributed import DistContext
from lorakit.train.tasks import make_task

from .conftest import model_dirs  # noqa: F401  (fixture)

SOURCES = ["a b c", "d c b a", "b b", "c a d d"]


@pytest.fixture
def t5_dir(model_dirs, tmp_path):
    """The tiny T5 with a BERT-style tokenizer, which emits token_type_ids (the reported bug:
    T5's generate refused them)."""
    import shutil

    from transformers import BertTokenizerFast

    directory = tmp_path / "t5-bert-tokenizer"
    shutil.copytree(model_dirs["t5"], directory)
    for file in directory.glob("*token*"):
        file.unlink()
    plain = load_tokenizer(str(model_dirs["bert"]))
    BertTokenizerFast(tokenizer_object=plain.backend_tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                      cls_token="[CLS]", sep_token="[SEP]", eos_token="</s>").save_pretrained(directory)  # fmt: skip
    return directory


@pytest.fixture
def t5_with_adapter(t5_dir):
    """The tiny T5 with a random adapter (B drawn non-zero, so it changes the outputs)."""
    model = load_model(str(t5_dir), "AutoModelForSeq2SeqLM").model
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_(std=0.5)
    return model.eval(), load_tokenizer(str(t5_dir))


def hf_greedy(model, tokenizer, source: str, max_new_tokens: int) -> str:
    """The oracle: transformers' own greedy generate on one unpadded source."""
    enc = tokenizer(source, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_seq2seq_generate_equals_transformers_generate(t5_with_adapter):
    model, tokenizer = t5_with_adapter
    assert "token_type_ids" in tokenizer("a b")  # the regression's condition
    task = make_task("seq2seq", tokenizer, 32)
    with torch.no_grad():
        batched = task.generate(model, SOURCES, batch_size=3, max_new_tokens=6)
        expected = [hf_greedy(model, tokenizer, s, 6) for s in SOURCES]
    assert batched == expected and any(batched)


def test_seq2seq_predict_and_bleu_rouge_against_the_libraries(t5_with_adapter):
    model, tokenizer = t5_with_adapter
    task = make_task("seq2seq", tokenizer, 32)
    # "a b c" has two references (E2E-style repeated sources): scored against both.
    examples = [{"source": "a b c", "target": "c b a"}, {"source": "a b c", "target": "a b c"},
                {"source": "d c b a", "target": "a b c d"}, {"source": "b b", "target": "b b"}]  # fmt: skip
    with torch.no_grad():
        predictions = task.predict(model, examples, batch_size=2, max_new_tokens=6)
        scores = task.evaluate(model, examples, batch_size=2, generate=3, max_new_tokens=6)
    assert predictions == [hf_greedy(model, tokenizer, e["source"], 6) for e in examples]
    hyps = [hf_greedy(model, tokenizer, s, 6) for s in ("a b c", "d c b a", "b b")]
    refs = [["c b a", "a b c"], ["a b c d"], ["b b"]]
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert scores["bleu"] == pytest.approx(BLEU().corpus_score(hyps, streams).score)
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / 3
    assert scores["rougeL"] == pytest.approx(100 * rouge)
    assert scores["perplexity"] == pytest.approx(torch.tensor(scores["loss"]).exp().item(), rel=1e-5)


def test_seq2seq_cli_predict_and_generative_eval(t5_dir, tmp_path):
    """The reported bug: `lorakit predict` / `eval --generate` on a seq2seq adapter whose
    tokenizer emits token_type_ids."""
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.train.api import load_trained

    rows = [{"source": s, "target": " ".join(reversed(s.split()))} for s in SOURCES * 4]
    data = tmp_path / "s2s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter"
    runner = CliRunner()
    args = ["train", "--model", t5_dir, "--task", "seq2seq", "--data", data, "--output", out,
            "--max-steps", "3", "--batch-size", "4", "--quiet"]  # fmt: skip
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    preds = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["predict", "--adapter", str(out), "--data", str(data), "--output", str(preds)])
    assert result.exit_code == 0, result.output
    trained = load_trained(None, out)
    with torch.no_grad():
        expected = [hf_greedy(trained.model, trained.tokenizer, r["source"], 64) for r in rows]
    assert [json.loads(line)["prediction"] for line in preds.read_text().splitlines()] == expected
    result = runner.invoke(app, ["eval", "--adapter", str(out), "--data", str(data), "--generate", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert {"bleu", "rougeL", "loss"} <= set(json.loads(result.stdout))


# -- chat templates ----------------------------------------------------------------------------
# Roles render as vocabulary words (c: user, d: assistant) so every token is a real one.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}c {% else %}d {% endif %}{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}d {% endif %}"
)


@pytest.fixture
def chat_tokenizer(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["llama"]))
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_response_goes_through_the_chat_template(chat_tokenizer):
    task = make_task("causal-lm", chat_tokenizer, 64)
    encoded = task.encode({"prompt": "the film", "response": "good"})
    prompt = ids(chat_tokenizer, "c the film d ")  # the template with the generation prompt
    answer = ids(chat_tokenizer, "good") + [chat_tokenizer.eos_token_id]
    assert encoded.input_ids == prompt + answer
    assert encoded.labels == [IGNORE] * len(prompt) + answer


def test_every_assistant_turn_of_a_conversation_is_supervised(chat_tokenizer):
    messages = [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "good"},
                {"role": "user", "content": "a b"}, {"role": "assistant", "content": "bad"}]  # fmt: skip
    encoded = make_task("causal-lm", chat_tokenizer, 64).encode({"messages": messages})
    assert encoded.input_ids == ids(chat_tokenizer, chat_tokenizer.apply_chat_template(messages, tokenize=False))
    supervised = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE]
    assert supervised == ids(chat_tokenizer, "good") + ids(chat_tokenizer, "bad")
    assert [label for label in encoded.labels if label != IGNORE] == supervised


# -- an adapter saved without a task -----------------------------------------------------------
def test_merge_infers_the_task_from_the_base_config(model_dirs, tmp_path):
    """A PEFT adapter without task_type: `lorakit merge` reads the base's architecture."""
    import transformers
    from typer.testing import CliRunner

    from lorakit.cli import app

    base = load_model(str(model_dirs["llama"]), "AutoModelForCausalLM").model
    lorakit.inject(
        base, lorakit.LoraConfig(r=2, init_lora_weights=False, base_model_name_or_path=str(model_dirs["llama"]))
    )
    lorakit.save_adapter(base, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] is None
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    inputs = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs).logits, base.eval()(inputs).logits, rtol=1e-4, atol=1e-5)


# -- distributed evaluation: shards and gathering ----------------------------------------------
@pytest.mark.parametrize("n,world", [(7, 2), (5, 3), (2, 4), (9, 3)])
def test_uneven_shards_gather_back_in_the_original_order(n, world, monkeypatch):
    """Each rank's padded shard, gathered as all_gather_object would: the original order, the
    padding rows dropped, every row exactly once."""
    from lorakit.train import distributed

    items = [f"row{i}" for i in range(n)]
    contexts = [DistContext(rank=r, world=world) for r in range(world)]
    shards = [c.shard(items) for c in contexts]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same batches
    real = [s[: c.shard_indices(n)[1]] for c, s in zip(contexts, shards)]
    assert sorted(x for rows in real for x in rows) == sorted(items)  # real rows once each (+ pads)

    def all_gather_object(parts, mine):
        parts[:] = shards

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    for rank in range(world):
        assert DistContext(rank=rank, world=world).gather(shards[rank], n) == items


def test_a_task_the_base_does_not_name_asks_for_task(model_dirs, tmp_path):
    """No lorakit task file, no PEFT task_type, and a base config without `architectures`:
    the error names the way out (--task), before any model is loaded."""
    import shutil

    from lorakit.train.api import load_trained

    base_dir = tmp_path / "base"
    shutil.copytree(model_dirs["llama"], base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("architectures", None)
    (base_dir / "config.json").write_text(json.dumps(config))
    model = load_model(str(model_dirs["llama"]), "AutoModelForCausalLM").model
    lorakit.save_adapter(lorakit.inject(model, lorakit.LoraConfig(r=2, base_model_name_or_path=str(base_dir))),
                         tmp_path / "adapter")  # fmt: skip
    with pytest.raises(ValueError, match=r"no task_type, and the base model's architecture .* pass --task"):
        load_trained(None, tmp_path / "adapter")
    assert load_trained(None, tmp_path / "adapter", task="causal-lm").task.name == "causal-lm"
