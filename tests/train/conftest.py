"""Tiny local model directories (random weights + a word-level tokenizer) and tiny data
files, so the whole training path (from_pretrained, tokenizer, trainer, CLI) runs in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = [
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "poor",
    "the",
    "film",
    "food",
    "was",
    "very",
    "not",
    "alice",
    "bob",
    "paris",
    "rome",
    "met",
    "in",
    "visited",
    "name",
    "city",
    "is",
    "a",
    "b",
    "c",
    "d",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]


def make_tokenizer(directory: Path, kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    elif kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 4)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="</s>",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    fast.save_pretrained(directory)
    return fast


def make_model_dir(root: Path, kind: str) -> Path:
    import transformers as tf

    directory = root / f"tiny-{kind}"
    if directory.exists():
        return directory
    torch.manual_seed(0)
    vocab = len(SPECIALS) + len(WORDS)
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=4)
    if kind == "bert":
        config = tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **common,
        )
        model = tf.BertModel(config)
    elif kind == "llama":
        config = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            initializer_range=0.3,
            **common,
        )  # a frozen lm_head with range: the loss can move
        model = tf.LlamaForCausalLM(config)
    elif kind == "llama-gqa":  # grouped-query attention: 4 query heads share 2 key/value heads
        config = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            **common,
        )
        model = tf.LlamaForCausalLM(config)
    elif kind == "qwen3-moe":  # a mixture of experts: fused 3-D expert weights
        config = tf.Qwen3MoeConfig(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            bos_token_id=2,
            initializer_range=0.3,
            **common,
        )
        model = tf.Qwen3MoeForCausalLM(config)
    elif kind == "gpt2":  # learned positions, fused c_attn Conv1D
        config = tf.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=2,
            **common,
        )
        model = tf.GPT2LMHeadModel(config)
    elif kind == "t5":
        config = tf.T5Config(
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
            dropout_rate=0.0,
            **common,
        )
        model = tf.T5ForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(directory)
    make_tokenizer(directory, kind)
    return directory


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: make_model_dir(root, kind) for kind in ("bert", "llama", "t5")}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Label = whether the sentence holds a positive word (a learnable toy task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        word = rng.choice(["good", "great", "fine"] if label else ["bad", "awful", "poor"])
        subject = rng.choice(["film", "food"])
        rows.append({"text": f"the {subject} was very {word}", "label": "pos" if label else "neg"})
    return rows


def ner_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, city = rng.choice(["alice", "bob"]), rng.choice(["paris", "rome"])
        rows.append(
            {"tokens": [person, "visited", city], "tags": ["B-PER", "O", "B-LOC"]}
            if rng.random() < 0.5
            else {"tokens": ["the", "city", "is", city], "tags": ["O", "O", "O", "B-LOC"]}
        )
    return rows


def copy_rows(n: int, seed: int, keys=("prompt", "response")) -> list[dict]:
    """Response = the prompt's letters reversed (needs the prompt: loss can fall a lot)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = [rng.choice("abcd") for _ in range(3)]
        rows.append({keys[0]: " ".join(letters), keys[1]: " ".join(reversed(letters))})
    return rows


@pytest.fixture
def data_files(tmp_path) -> dict[str, tuple[Path, Path]]:
    return {
        "classification": (
            write_jsonl(tmp_path / "cls_train.jsonl", sentiment_rows(64, 0)),
            write_jsonl(tmp_path / "cls_dev.jsonl", sentiment_rows(24, 1)),
        ),
        "ner": (
            write_jsonl(tmp_path / "ner_train.jsonl", ner_rows(64, 0)),
            write_jsonl(tmp_path / "ner_dev.jsonl", ner_rows(16, 1)),
        ),
        "causal-lm": (
            write_jsonl(tmp_path / "lm_train.jsonl", copy_rows(64, 0)),
            write_jsonl(tmp_path / "lm_dev.jsonl", copy_rows(16, 1)),
        ),
        "seq2seq": (
            write_jsonl(tmp_path / "s2s_train.jsonl", copy_rows(64, 0, ("source", "target"))),
            write_jsonl(tmp_path / "s2s_dev.jsonl", copy_rows(16, 1, ("source", "target"))),
        ),
    }


MODEL_FOR_TASK = {"classification": "bert", "ner": "bert", "causal-lm": "llama", "seq2seq": "t5"}
