"""What the text-generating tasks (causal-lm, seq2seq) share: loss and perplexity, BLEU and
ROUGE-L of greedy outputs against every reference, and one batched generation loop."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, ClassVar

import torch

from ...lora import mixed_batch
from .. import metrics as M
from ..distributed import DistContext
from .base import Task, on_device


def group_references(
    examples: Sequence[dict], source_key: str = "source", target_key: str = "target"
) -> dict[str, list[str]]:
    """Group the references of repeated sources (E2E lists each MR once per reference).

    Returns ``{source: [reference, ...]}`` in first-seen order, which is what multi-reference
    BLEU needs: one hypothesis per key, scored against all its references."""
    groups: dict[str, list[str]] = {}
    for example in examples:
        groups.setdefault(example[source_key], []).append(example[target_key])
    return groups


class Generative(Task):
    generative = True
    source_key: ClassVar[str]  # the example key generation reads ...
    target_key: ClassVar[str]  # ... and the one holding its reference

    def evaluate(
        self,
        model,
        examples,
        batch_size: int = 32,
        generate: int = 0,
        max_new_tokens: int = 64,
        loss_examples: int | None = None,
        dist: DistContext | None = None,
        **kwargs,
    ) -> dict[str, float]:
        """Loss and perplexity (on the first `loss_examples` examples, default all); with
        `generate` > 0, also corpus BLEU and ROUGE-L of greedy outputs for that many distinct
        inputs, each against all of its references."""
        dist = dist or DistContext()
        loss = self.eval_loss(model, examples[:loss_examples], batch_size, dist)
        scores = {"loss": loss, "perplexity": M.perplexity(loss)}
        if generate > 0:
            refs = group_references(examples, self.source_key, self.target_key)
            sources = list(refs)[:generate]
            mine = self.generate(
                model,
                dist.shard(sources),
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                synced=dist.enabled and dist.strategy == "fsdp",
            )
            hyps = dist.gather(mine, len(sources))
            scores["bleu"] = M.bleu(hyps, [refs[s] for s in sources])
            scores["rougeL"] = M.rouge_l(hyps, [refs[s] for s in sources])
        return scores

    def predict(self, model, examples, batch_size: int = 16, max_new_tokens: int = 64) -> list[str]:
        return self.generate(
            model, [e[self.source_key] for e in examples], batch_size=batch_size, max_new_tokens=max_new_tokens
        )

    @torch.no_grad()
    def generate(
        self,
        model,
        prompts: Sequence[str],
        batch_size: int = 16,
        max_new_tokens: int = 64,
        adapter_names: Sequence[str | None] | None = None,
        synced: bool = False,
    ) -> list[str]:
        """Greedy outputs, one per prompt. `adapter_names` gives one adapter per prompt (a mixed
        batch); `synced` keeps every rank decoding until all finish (FSDP)."""
        outputs: list[str] = []
        for start in range(0, len(prompts), batch_size):
            enc = on_device(self.generation_inputs(prompts[start : start + batch_size]), model)
            names = adapter_names[start : start + batch_size] if adapter_names is not None else None
            with mixed_batch(model, names) if names is not None else nullcontext():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    synced_gpus=synced,
                )
            new = self.new_tokens(out, enc["input_ids"])
            outputs += [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return outputs

    def generation_inputs(self, prompts: Sequence[str]) -> Any:
        """A batch of prompts as `generate`'s inputs (input_ids, attention_mask only)."""
        raise NotImplementedError

    def new_tokens(self, generated: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The generated continuation without the prompt."""
        return generated
