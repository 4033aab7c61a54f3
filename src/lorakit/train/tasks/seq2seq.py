"""Sequence to sequence: source -> target. Metric: loss (+ BLEU, ROUGE-L with --eval-generate).

Example: ``{'source': str, 'target': str}``. Columns: text (the source), label (the target).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..batching import IGNORE, Encoded, pad
from .base import ColumnFinder, Fields, Overrides, value
from .generative import Generative

PAIRS = (
    ("source", "target"),
    ("input", "output"),
    ("src", "tgt"),
    ("document", "summary"),
    ("article", "highlights"),
    ("article", "summary"),
    ("dialogue", "summary"),
    ("mr", "ref"),
    ("meaning_representation", "human_reference"),
    ("meaning_representation", "target"),
    ("question", "answer"),
    ("prompt", "response"),
)


class Seq2Seq(Generative):
    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    architectures = ("ForConditionalGeneration", "ForSeq2SeqLM")
    source_key, target_key = "source", "target"

    @classmethod
    def choose_fields(cls, find: ColumnFinder, given: Overrides) -> Fields:
        if given.auto and (pair := find.pair(PAIRS)):
            return Fields(cls.name, text=pair[0], label=pair[1])
        text = find.one(given.text, [a for a, _ in PAIRS], "text")
        return Fields(cls.name, text=text, label=find.one(given.label, [b for _, b in PAIRS], "label", exclude=(text,)))

    @staticmethod
    def to_example(record: dict, fields: Fields) -> dict:
        return {"source": str(value(record, fields.text)), "target": str(value(record, fields.label))}

    def encode(self, example: dict) -> Encoded:
        source = self.tokenizer(example["source"], truncation=False)["input_ids"]
        target = (
            self.tokenizer(text_target=example["target"], truncation=True, max_length=self.max_length)["input_ids"]
            if "target" in example
            else None
        )
        truncated = len(source) > self.max_length
        # Truncation keeps the source's last token (its end-of-sequence marker).
        return Encoded(
            source[: self.max_length - 1] + source[-1:] if truncated else source, target, truncated=truncated
        )

    def _collate_labels(self, batch: Sequence[Encoded], width: int):
        return pad([e.labels for e in batch], max(len(e.labels) for e in batch), IGNORE)

    def model_inputs(self, batch, model):
        inputs = super().model_inputs(batch, model)
        if "labels" in batch:  # the decoder reads the targets shifted right (teacher forcing)
            inputs["decoder_input_ids"] = getattr(model, "module", model).prepare_decoder_input_ids_from_labels(
                labels=batch["labels"]
            )
        return inputs

    def generation_inputs(self, prompts):
        # No token_type_ids: encoder-decoder models take none, and `generate` refuses unused
        # kwargs (a BERT-style tokenizer on a T5 model emits them).
        return self.tokenizer(
            list(prompts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_token_type_ids=False,
        )
