"""Causal-LM instruction tuning: prompt -> response, loss on the response only. Metric: loss
(+ BLEU, ROUGE-L with --eval-generate).

Example: ``{'prompt': str, 'response': str}`` or ``{'messages': [{'role', 'content'}, ...]}``.
Columns: text (the prompt, or the whole document when there is no label column), pair (an
instruction's 'input', appended to the prompt), label (the response), messages (a chat column).
The prompt goes through a prompt template if the run was given one (`--prompt-template`, e.g.
"Describe the restaurant.\n{prompt}"; saved with the adapter so eval / generate apply it too),
then through the model's chat template where it has one (`chat_text`, which the server uses too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..batching import IGNORE, PACK_FROM_PADDING, Encoded, pack, padding_share
from ..data import DataError
from .base import ColumnFinder, Fields, Overrides, takes_argument, value
from .generative import Generative
from .seq2seq import PAIRS as SEQ2SEQ_PAIRS

PAIRS = (
    ("prompt", "response"),
    ("prompt", "completion"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "answer"),
    ("query", "response"),
)
MESSAGES = ("messages", "conversation")
DOCUMENT = ("text", "content", "document")


PROMPT_SLOT = "{prompt}"


def check_prompt_template(template: str) -> None:
    """A template must hold the prompt's slot exactly once: without it every example would read
    the same text; twice is almost surely a mistake in the template."""
    count = template.count(PROMPT_SLOT)
    if count != 1:
        raise DataError(
            f"--prompt-template must contain {PROMPT_SLOT} exactly once (where each example's prompt goes); "
            f"it contains it {count} times: {template!r}"
        )


def fill_template(template: str | None, prompt: str) -> str:
    """The prompt placed in the template's {prompt} slot (plain replacement: other braces in the
    template are literal text, so JSON or code in an instruction needs no escaping)."""
    return prompt if template is None else template.replace(PROMPT_SLOT, prompt)


def chat_text(tokenizer: Any, messages: Sequence[dict]) -> str:
    """A conversation as the model reads it before its answer: the tokenizer's chat template
    with the generation prompt, else each message's content on its own line."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['content']}\n" for m in messages if m["content"])


class CausalLM(Generative):
    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    architectures = ("ForCausalLM", "LMHeadModel")
    source_key, target_key = "prompt", "response"
    can_pack, label_shift = True, 1
    prompt_template: str | None = None  # set by make_task from --prompt-template

    @classmethod
    def choose_fields(cls, find: ColumnFinder, given: Overrides) -> Fields:
        messages = given.messages
        if messages is None and given.auto:
            messages = find.one(None, MESSAGES, "messages", required=False)
        if messages:
            return Fields(cls.name, messages=messages)
        pair_field = given.pair
        if given.auto and (pair := find.pair(PAIRS + SEQ2SEQ_PAIRS)):
            text, label = pair
        elif given.label:  # a response column; find the prompt beside it
            label = given.label
            text = find.one(given.text, [a for a, _ in PAIRS + SEQ2SEQ_PAIRS], "text", exclude=(label,))
        else:  # one column that is the whole document (prompt is empty, loss on everything)
            text, label = find.one(given.text, DOCUMENT, "text"), None
        # Alpaca-style data: the optional 'input' belongs to the instruction, not the response.
        if pair_field is None and given.auto and text.lower() == "instruction":
            pair_field = find.one(None, ("input",), "pair", required=False)
        return Fields(cls.name, text=text, pair=pair_field, label=label)

    @staticmethod
    def to_example(record: dict, fields: Fields) -> dict:
        if fields.messages:
            messages = value(record, fields.messages)
            chat = isinstance(messages, list) and all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages
            )
            if not chat:
                raise DataError(
                    f"column {fields.messages!r} must hold lists of {{'role': ..., 'content': ...}} messages"
                )
            return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        if fields.label is None:
            return {"prompt": "", "response": str(value(record, fields.text))}
        prompt = str(value(record, fields.text))
        extra = str(record.get(fields.pair) or "").strip() if fields.pair else ""  # optional, often empty
        # The chat/prompt template is the encoder's business; here the input just follows the instruction.
        return {"prompt": f"{prompt}\n\n{extra}" if extra else prompt, "response": str(value(record, fields.label))}

    # -- encoding -----------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        """What the model reads before the response: the prompt in the run's template, as the
        user's turn of the chat template (conversations in `messages` use neither)."""
        return chat_text(self.tokenizer, [{"role": "user", "content": fill_template(self.prompt_template, prompt)}])

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
            text = self.tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if message["role"] == "assistant":
                head = self.tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                prompt_part = self._ids(head[len(done) :])
                answer = self._ids(text[len(head) :])
                ids += prompt_part + answer
                labels += [IGNORE] * len(prompt_part) + answer
            else:
                part = self._ids(text[len(done) :])
                ids += part
                labels += [IGNORE] * len(part)
            done = text
        return self._truncate(ids, labels)

    def _truncate(self, ids: list[int], labels: list[int]) -> Encoded:
        truncated = len(ids) > self.max_length
        return Encoded(ids[: self.max_length], labels[: self.max_length], truncated=truncated)

    def collate(self, batch, packed: bool = False):
        """Packed (`batching.pack`) when asked and padding would be a real share of this batch:
        measured on SmolLM2 (benchmarks/packing.py), packing a batch that is 8% padding gains
        nothing and fragments more memory, one that is 40% padding is 12-15% faster."""
        if packed and padding_share(batch) >= PACK_FROM_PADDING:
            return pack(batch)
        return super().collate(batch)

    # -- loss ---------------------------------------------------------------------------------
    def model_inputs(self, batch, model):
        inputs = super().model_inputs(batch, model)
        if "labels" in batch and _takes_logits_mask(model):
            # Logits only where the loss has a target: the LM head and the softmax over the
            # vocabulary (49k wide for SmolLM2) are a large share of a step, and most
            # positions are prompt tokens. Output: (targets, vocab) instead of (B, T, vocab).
            inputs["logits_to_keep"] = _predicting_positions(batch["labels"])
        return inputs

    def loss_sum(self, outputs, batch):
        logits, targets = outputs.logits, batch["labels"][:, 1:]  # position t predicts token t+1
        if logits.ndim == 2:  # (targets, vocab): already selected
            targets = targets[targets != IGNORE]
        else:  # (B, T, vocab)
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")

    # -- generation ---------------------------------------------------------------------------
    def generation_inputs(self, prompts):
        # Left padding: every row's next token follows its own last prompt token.
        return self.tokenizer(
            [self.prompt_text(p) for p in prompts],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
            return_token_type_ids=False,
        )

    def new_tokens(self, generated, input_ids):
        return generated[:, input_ids.shape[1] :]


def _predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose next token is a loss target (row-major order matches
    `labels[:, 1:][labels[:, 1:] != IGNORE]`)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


_LOGITS_MASK: dict[type, bool] = {}


def _takes_logits_mask(model) -> bool:
    """Whether `model` takes a boolean (B, T) `logits_to_keep` (transformers' causal LMs since
    `slice_logits_to_keep` exists); memoised per model class."""
    kind = type(getattr(model, "module", model))
    if kind not in _LOGITS_MASK:
        try:
            from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401

            _LOGITS_MASK[kind] = takes_argument(model, "logits_to_keep")
        except ImportError:
            _LOGITS_MASK[kind] = False
    return _LOGITS_MASK[kind]
