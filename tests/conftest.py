"""Tiny randomly initialised models (a few thousand parameters) so the suite stays fast."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

logging.getLogger("transformers").setLevel(logging.ERROR)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny(kind: str) -> nn.Module:
    """A tiny random Hugging Face model in eval mode (no dropout noise), seeded."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=64)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, **common)
        )
    elif kind == "llama":
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
                **common,
            )
        )
    elif kind == "bert":
        model = tf.BertForSequenceClassification(
            tf.BertConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
                num_labels=3,
                **common,
            )
        )
    elif kind == "t5":
        model = tf.T5ForConditionalGeneration(
            tf.T5Config(
                d_model=16,
                d_kv=8,
                d_ff=32,
                num_layers=2,
                num_heads=2,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
                **common,
            )
        )
    else:
        raise ValueError(kind)
    return model.eval()


def tiny_inputs(kind: str, batch: int = 3, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (batch, seq), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, 64, (batch, 5), generator=g)}
    return {"input_ids": ids}


def assert_mixed_equals_alone(model: nn.Module, rows: list, run) -> None:
    """A mixed batch (row i on adapter rows[i], None: the base) equals each adapter alone on
    the whole batch, row by row. `run(model)` -> the model's logits on a fixed batch."""
    import lorakit

    alone = {}
    for name in {n for n in rows if n is not None}:
        lorakit.set_adapter(model, name)
        alone[name] = run(model)
    with lorakit.disable_adapters(model):
        alone[None] = run(model)
    with lorakit.mixed_batch(model, rows):
        mixed = run(model)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)


def train_losses(model: nn.Module, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    """The losses of `steps` AdamW steps on the trainable parameters, next-token loss on `ids`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


class Toy(nn.Module):
    """Every supported layer type in one plain PyTorch model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)  # [b, 4]
        return h + self.conv(image).mean((2, 3))[:, :4]


@pytest.fixture
def toy() -> Toy:
    return Toy().eval()


@pytest.fixture
def toy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 20, (3, 5), generator=g), torch.randn(3, 3, 8, 8, generator=g)


@pytest.fixture
def captured_trainer(monkeypatch) -> dict:
    """A dict that will hold, under "trainer", the Trainer the next `train()` call builds (for
    callbacks that reach into it)."""
    from lorakit.train import trainer as trainer_module

    ref: dict = {}
    original = trainer_module.Trainer.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        ref["trainer"] = self

    monkeypatch.setattr(trainer_module.Trainer, "__init__", remember)
    return ref


LLAMA_CPP_VERSION = "0.3.36"


@pytest.fixture(scope="session")
def llama_cpp_source(tmp_path_factory) -> Path:
    """llama.cpp's sources from the llama-cpp-python source archive (PyPI), for its converter."""
    cache = Path(os.environ.get("LORAKIT_LLAMA_CPP_SRC", tmp_path_factory.mktemp("llama-cpp")))
    source = cache / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if not (source / "convert_lora_to_gguf.py").is_file():
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
               f"llama-cpp-python=={LLAMA_CPP_VERSION}"]  # fmt: skip
        if subprocess.run(pip, capture_output=True).returncode:
            pytest.skip("llama-cpp-python's source archive is not reachable (no package index)")
        subprocess.run(["tar", "xzf", str(next(cache.glob("llama_cpp_python-*.tar.gz"))), "-C", str(cache)], check=True)
    return source
