"""Task specs: how each task turns examples into tensors, and how it is scored.

A `Task` knows four things: `encode` one example into token ids (and labels), `collate` a
list of encoded examples into a padded batch (dynamic padding: only to the batch's longest),
`evaluate` a model on examples, and `predict` (what `lorakit predict` writes).

    classification   text (+ pair) -> label             metric: accuracy (also f1)
    ner              tokens -> BIO tags, first sub-token labelled   metric: entity f1 (seqeval)
    causal-lm        prompt -> response, loss on the response only  metric: loss (+ BLEU, ROUGE-L)
    seq2seq          source -> target                   metric: loss (+ BLEU, ROUGE-L)
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics as M
from .data import group_references
from .distributed import DistContext

IGNORE = -100   # label id the loss skips (prompt tokens, padding, non-first sub-tokens)
PACK_FROM_PADDING = 0.15   # causal-lm: pack a batch whose padded layout would be at least this much padding


@dataclass
class Encoded:
    """One example as token ids. `labels` is an int (classification) or a list aligned
    with (NER, causal-lm) or independent of (seq2seq) `input_ids`."""
    input_ids: list[int]
    labels: Any = None
    token_type_ids: list[int] | None = None
    word_ids: list[int | None] | None = None     # NER: which word each token came from
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Task:
    """Base task: subclasses fill in encode / predictions / scores."""
    tokenizer: Any
    max_length: int = 128
    labels: list[str] = field(default_factory=list)     # classification / NER label names
    name: str = ""
    metric: str = "loss"                                 # what picks the best checkpoint
    greater_is_better: bool = False
    pack_batches = False     # causal-lm: padding-free rows (train/packing.py); the trainer sets it

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, example: dict) -> Encoded:
        raise NotImplementedError

    def encode_all(self, examples: Sequence[dict]) -> list[Encoded]:
        return [self.encode(e) for e in examples]

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def collate(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Pad to the longest row of this batch (right padding), with an attention mask."""
        width = max(len(e) for e in batch)
        out = {"input_ids": _pad([e.input_ids for e in batch], width, self._pad_id()),
               "attention_mask": _pad([[1] * len(e) for e in batch], width, 0)}
        if batch[0].token_type_ids is not None:
            out["token_type_ids"] = _pad([e.token_type_ids for e in batch], width, 0)
        if batch[0].labels is not None:
            out["labels"] = self._collate_labels(batch, width)
        return out

    def _collate_labels(self, batch: Sequence[Encoded], width: int) -> torch.Tensor:
        return _pad([e.labels for e in batch], width, IGNORE)

    # -- evaluation -------------------------------------------------------------------------
    def count_targets(self, encoded: Sequence[Encoded]) -> int:
        """How many terms the loss sums over for these examples (padding adds none)."""
        count = 0
        for e in encoded:
            if e.labels is None:
                continue
            if isinstance(e.labels, int):
                count += e.labels != IGNORE
                continue
            labels = e.labels[1:] if self.name == "causal-lm" else e.labels   # causal LMs shift by one
            count += sum(label != IGNORE for label in labels)
        return count

    def model_inputs(self, batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """What `model` is called with: the batch without its labels (the task computes the
        loss itself; given labels, a Hugging Face model would compute a second one)."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def loss_sum(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy summed over the batch's targets (not averaged: the trainer divides by
        the whole step's target count, so accumulation and data parallelism stay exact)."""
        logits, labels = outputs.logits, batch["labels"]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")

    @torch.no_grad()
    def forward_all(self, model: nn.Module, encoded: Sequence[Encoded], batch_size: int, predict: bool = True
                    ) -> tuple[list[torch.Tensor], float, float]:
        """One forward per batch: each batch's argmax predictions (if `predict`), and the loss
        summed over targets with the number of targets (rows without labels add nothing)."""
        preds, total, count = [], 0.0, 0.0
        for batch in _batches(encoded, batch_size):
            inputs = on_device(self.collate(batch), model)
            out = model(**self.model_inputs(inputs, model))
            if "labels" in inputs:
                total += self.loss_sum(out, inputs).item()
                count += self.count_targets(batch)
            if predict:
                preds.append(out.logits.argmax(-1))
        return preds, total, count

    def eval_loss(self, model: nn.Module, examples: Sequence[dict], batch_size: int,
                  dist: DistContext | None = None) -> float:
        """Mean loss per target, computed on this rank's shard and summed across ranks."""
        dist = dist or DistContext()
        _, total, count = self.forward_all(model, self.encode_shard(examples, dist), batch_size, predict=False)
        total, count = dist.sum([total, count])
        return total / max(count, 1)

    def encode_shard(self, examples: Sequence[dict], dist: DistContext) -> list[Encoded]:
        """This rank's examples, encoded; rows that only pad the shard carry no loss targets."""
        indices, real = dist.shard_indices(len(examples))
        encoded = [self.encode(examples[i]) for i in indices]
        return encoded[:real] + [_without_targets(e) for e in encoded[real:]]

    def evaluate(self, model: nn.Module, examples: Sequence[dict], batch_size: int = 32,
                 dist: DistContext | None = None, **kwargs) -> dict[str, float]:
        raise NotImplementedError


# -- classification ------------------------------------------------------------------------
class Classification(Task):
    def __init__(self, tokenizer, max_length: int = 128, labels: Sequence[str] = ()) -> None:
        super().__init__(tokenizer, max_length, list(labels), "classification", "accuracy", True)
        self.label_ids = {label: i for i, label in enumerate(self.labels)}

    def encode(self, example: dict) -> Encoded:
        enc = self.tokenizer(example["text"], example.get("text_pair"), truncation=False)
        truncated = len(enc["input_ids"]) > self.max_length
        if truncated:
            enc = self.tokenizer(example["text"], example.get("text_pair"), truncation=True, max_length=self.max_length)
        label = self.label_ids[example["label"]] if "label" in example else None
        return Encoded(enc["input_ids"], label, enc.get("token_type_ids"), truncated=truncated)

    def _collate_labels(self, batch, width):
        return torch.tensor([e.labels for e in batch])

    def predict(self, model, examples, batch_size: int = 32) -> list[str]:
        preds, _, _ = self.forward_all(model, self.encode_all(examples), batch_size)
        return [self.labels[int(i)] for batch in preds for i in batch]

    def evaluate(self, model, examples, batch_size: int = 32, dist: DistContext | None = None,
                 **kwargs) -> dict[str, float]:
        """Accuracy and F1 (percent) and loss, one forward pass per batch, sharded over ranks."""
        dist = dist or DistContext()
        preds, total, count = self.forward_all(model, self.encode_shard(examples, dist), batch_size)
        ids = dist.gather([int(i) for batch in preds for i in batch], len(examples))
        scores = M.classification_scores([self.labels[i] for i in ids], [e["label"] for e in examples], self.labels)
        total, count = dist.sum([total, count])
        return {"loss": total / max(count, 1), **scores}


# -- token classification (NER) ------------------------------------------------------------
class TokenClassification(Task):
    """Words are split into sub-tokens; the first sub-token of each word carries the word's
    tag, the others (and special tokens) are ignored by the loss (the usual BERT recipe)."""

    def __init__(self, tokenizer, max_length: int = 128, labels: Sequence[str] = ()) -> None:
        super().__init__(tokenizer, max_length, list(labels), "ner", "f1", True)
        self.label_ids = {label: i for i, label in enumerate(self.labels)}

    def encode(self, example: dict) -> Encoded:
        enc = self.tokenizer(example["tokens"], is_split_into_words=True, truncation=True,
                             max_length=self.max_length)
        word_ids = enc.word_ids()
        tags = example.get("tags")
        labels, previous = [], None
        for w in word_ids:
            first = w is not None and w != previous
            labels.append(self.label_ids[tags[w]] if first and tags is not None else IGNORE)
            previous = w
        kept = {w for w in word_ids if w is not None}
        return Encoded(enc["input_ids"], labels if tags is not None else None, enc.get("token_type_ids"),
                       word_ids=word_ids, truncated=len(kept) < len(example["tokens"]))

    def _tags(self, encoded: Sequence[Encoded], preds: list[torch.Tensor], examples: Sequence[dict]) -> list[list[str]]:
        """Per word, the tag predicted at its first sub-token; words cut by truncation stay "O"."""
        rows = [row for batch in preds for row in batch.tolist()]
        out = []
        for row, enc, ex in zip(rows, encoded, examples):
            tags, previous = ["O"] * len(ex["tokens"]), None
            for pos, w in enumerate(enc.word_ids):
                if w is not None and w != previous:
                    tags[w] = self.labels[row[pos]]
                previous = w
            out.append(tags)
        return out

    def predict(self, model, examples, batch_size: int = 32) -> list[list[str]]:
        encoded = self.encode_all(examples)
        preds, _, _ = self.forward_all(model, encoded, batch_size)
        return self._tags(encoded, preds, examples)

    def evaluate(self, model, examples, batch_size: int = 32, dist: DistContext | None = None,
                 **kwargs) -> dict[str, float]:
        """Entity-level P/R/F1 (seqeval, percent) and loss, sharded over ranks."""
        dist = dist or DistContext()
        encoded = self.encode_shard(examples, dist)
        preds, total, count = self.forward_all(model, encoded, batch_size)
        tags = dist.gather(self._tags(encoded, preds, dist.shard(examples)), len(examples))
        scores = M.ner_scores(tags, [e["tags"] for e in examples])
        total, count = dist.sum([total, count])
        return {"loss": total / max(count, 1), **scores}


# -- generation tasks ----------------------------------------------------------------------
class _Generative(Task):
    max_new_tokens: int = 64

    def evaluate(self, model, examples, batch_size: int = 32, generate: int = 0, max_new_tokens: int = 64,
                 loss_examples: int | None = None, dist: DistContext | None = None, **kwargs) -> dict[str, float]:
        """Loss and perplexity (on the first `loss_examples` examples, default all); with
        `generate` > 0, also corpus BLEU and ROUGE-L of greedy outputs for that many distinct
        inputs, each against all of its references."""
        dist = dist or DistContext()
        loss = self.eval_loss(model, examples[:loss_examples], batch_size, dist)
        scores = {"loss": loss, "perplexity": M.perplexity(loss)}
        if generate > 0:
            refs = group_references(examples, *self._ref_keys())
            sources = list(refs)[:generate]
            mine = self.generate(model, dist.shard(sources), batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 synced=dist.enabled and dist.strategy == "fsdp")
            hyps = dist.gather(mine, len(sources))
            scores["bleu"] = M.bleu(hyps, [refs[s] for s in sources])
            scores["rougeL"] = M.rouge_l(hyps, [refs[s] for s in sources])
        return scores

    def _ref_keys(self) -> tuple[str, str]:
        raise NotImplementedError

    def predict(self, model, examples, batch_size: int = 16, max_new_tokens: int = 64) -> list[str]:
        key = self._ref_keys()[0]
        return self.generate(model, [e[key] for e in examples], batch_size=batch_size, max_new_tokens=max_new_tokens)

    def generate(self, model, prompts: Sequence[str], batch_size: int = 16, max_new_tokens: int = 64,
                 adapter_names: Sequence[str | None] | None = None, synced: bool = False) -> list[str]:
        """Greedy outputs; `synced` keeps every rank decoding until all finish (FSDP)."""
        raise NotImplementedError


class CausalLM(_Generative):
    """Instruction tuning: the prompt goes through the model's chat template where it has
    one; the loss covers only the response tokens (and the end-of-sequence token)."""

    def __init__(self, tokenizer, max_length: int = 256, labels: Sequence[str] = ()) -> None:
        super().__init__(tokenizer, max_length, [], "causal-lm", "loss", False)

    def _ref_keys(self):
        return "prompt", "response"

    def prompt_text(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      tokenize=False, add_generation_prompt=True)
        return f"{prompt}\n" if prompt else ""

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _eos(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def encode(self, example: dict) -> Encoded:
        if "messages" in example:
            return self._encode_chat(example["messages"])
        prompt = self._ids(self.prompt_text(example["prompt"]))
        response = self._ids(example["response"]) + self._eos()
        return self._truncate(prompt + response, [IGNORE] * len(prompt) + response)

    def _encode_chat(self, messages: list[dict]) -> Encoded:
        """Every assistant turn is supervised; each turn's tokens are the difference between
        the templated conversation up to and including it and the one before it."""
        ids, labels, done = [], [], ""
        for i, message in enumerate(messages):
            text = self.tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            if message["role"] == "assistant":
                head = self.tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                prompt_part = self._ids(head[len(done):])
                answer = self._ids(text[len(head):])
                ids += prompt_part + answer
                labels += [IGNORE] * len(prompt_part) + answer
            else:
                part = self._ids(text[len(done):])
                ids += part
                labels += [IGNORE] * len(part)
            done = text
        return self._truncate(ids, labels)

    def _truncate(self, ids: list[int], labels: list[int]) -> Encoded:
        truncated = len(ids) > self.max_length
        return Encoded(ids[:self.max_length], labels[:self.max_length], truncated=truncated)

    def collate(self, batch):
        """Packed (train/packing.py) when the task packs and padding would be a real share of
        this batch: measured on SmolLM2 (benchmarks/packing.py), packing a batch that is 8%
        padding gains nothing and fragments more memory, one that is 40% padding is 12-15% faster."""
        if self.pack_batches and padding_share(batch) >= PACK_FROM_PADDING:
            from .packing import pack
            return pack(batch)
        return super().collate(batch)

    def model_inputs(self, batch, model):
        inputs = super().model_inputs(batch, model)
        if "labels" in batch and _takes_logits_mask(model):
            # Logits only where the loss has a target: the LM head and the softmax over the
            # vocabulary (49k wide for SmolLM2) are a large share of a step, and most
            # positions are prompt tokens. Output: (targets, vocab) instead of (B, T, vocab).
            inputs["logits_to_keep"] = _predicting_positions(batch["labels"])
        return inputs

    def loss_sum(self, outputs, batch):
        logits, targets = outputs.logits, batch["labels"][:, 1:]      # position t predicts token t+1
        if logits.ndim == 2:                                         # (targets, vocab): already selected
            targets = targets[targets != IGNORE]
        else:                                                        # (B, T, vocab)
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")

    @torch.no_grad()
    def generate(self, model, prompts, batch_size: int = 16, max_new_tokens: int = 64,
                 adapter_names=None, synced: bool = False) -> list[str]:
        """Greedy decoding, left-padded batches; `adapter_names` gives one adapter per prompt
        (mixed batch) when set."""
        from ..lora import mixed_batch
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        outputs: list[str] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = [self.prompt_text(p) for p in prompts[start:start + batch_size]]
                enc = on_device(tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False), model)
                names = adapter_names[start:start + batch_size] if adapter_names is not None else None
                ctx = mixed_batch(model, names) if names is not None else nullcontext()
                with ctx:
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id, synced_gpus=synced)
                new = gen[:, enc["input_ids"].shape[1]:]
                outputs += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        finally:
            tok.padding_side = side
        return outputs


class Seq2Seq(_Generative):
    def __init__(self, tokenizer, max_length: int = 256, labels: Sequence[str] = ()) -> None:
        super().__init__(tokenizer, max_length, [], "seq2seq", "loss", False)

    def _ref_keys(self):
        return "source", "target"

    def encode(self, example: dict) -> Encoded:
        source = self.tokenizer(example["source"], truncation=False)["input_ids"]
        target = self.tokenizer(text_target=example["target"], truncation=True, max_length=self.max_length)["input_ids"] \
            if "target" in example else None
        truncated = len(source) > self.max_length
        return Encoded(source[:self.max_length - 1] + source[-1:] if truncated else source, target, truncated=truncated)

    def _collate_labels(self, batch, width):
        return _pad([e.labels for e in batch], max(len(e.labels) for e in batch), IGNORE)

    def model_inputs(self, batch, model):
        inputs = super().model_inputs(batch, model)
        if "labels" in batch:    # the decoder reads the targets shifted right (teacher forcing)
            inputs["decoder_input_ids"] = getattr(model, "module", model).prepare_decoder_input_ids_from_labels(
                labels=batch["labels"])
        return inputs

    @torch.no_grad()
    def generate(self, model, prompts, batch_size: int = 16, max_new_tokens: int = 64,
                 adapter_names=None, synced: bool = False) -> list[str]:
        from ..lora import mixed_batch
        outputs: list[str] = []
        for start in range(0, len(prompts), batch_size):
            enc = on_device(self.tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                                           truncation=True, max_length=self.max_length), model)
            names = adapter_names[start:start + batch_size] if adapter_names is not None else None
            with (mixed_batch(model, names) if names is not None else nullcontext()):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced)
            outputs += [t.strip() for t in self.tokenizer.batch_decode(gen, skip_special_tokens=True)]
        return outputs


TASK_CLASSES: dict[str, type[Task]] = {
    "classification": Classification, "ner": TokenClassification, "causal-lm": CausalLM, "seq2seq": Seq2Seq,
}


def make_task(name: str, tokenizer, max_length: int, labels: Sequence[str] = ()) -> Task:
    if name not in TASK_CLASSES:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_CLASSES)}")
    return TASK_CLASSES[name](tokenizer, max_length, labels)


# -- helpers -------------------------------------------------------------------------------
def _predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose next token is a loss target (row-major order matches
    `labels[:, 1:][labels[:, 1:] != IGNORE]`)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


_LOGITS_MASK: dict[type, bool] = {}


def _takes_logits_mask(model: nn.Module) -> bool:
    """Whether `model` (or the module a DDP wrapper holds) takes a boolean (B, T)
    `logits_to_keep` (transformers' causal LMs since `slice_logits_to_keep` exists)."""
    model = getattr(model, "module", model)
    kind = type(model)
    if kind not in _LOGITS_MASK:
        try:
            from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
            _LOGITS_MASK[kind] = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (ImportError, TypeError, ValueError):
            _LOGITS_MASK[kind] = False
    return _LOGITS_MASK[kind]


def on_device(batch: Any, model: nn.Module) -> dict[str, Any]:
    """The batch's tensors on the device of `model`'s parameters (a no-op on CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}


def _without_targets(enc: Encoded) -> Encoded:
    """The same inputs with every label ignored (a row that only pads a rank's shard)."""
    if enc.labels is None:
        return enc
    labels = IGNORE if isinstance(enc.labels, int) else [IGNORE] * len(enc.labels)
    return Encoded(enc.input_ids, labels, enc.token_type_ids, enc.word_ids, enc.truncated)


def padding_share(batch: Sequence[Encoded]) -> float:
    """The fraction of a right-padded (len(batch), longest) layout that would be padding."""
    return 1 - sum(len(e) for e in batch) / (len(batch) * max(len(e) for e in batch))


def _pad(rows: Iterable[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
