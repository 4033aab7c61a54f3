"""lm-evaluation-harness tasks for many adapters at once, in process (`lorakit eval --harness`).

`AdapterLM` is lm-eval's model interface for one adapter of a model that holds several. The
first adapter's evaluation scores every request for all of them in one pass (each batch's rows
repeated per adapter and routed by `mixed_batch`); the others find their answers kept in the
shared `Scores`. Loglikelihoods (multiple choice) and greedy `generate_until` are supported;
rolling loglikelihoods (perplexity tasks) are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..lora import mixed_batch


class Scores:
    """Every adapter's answer to every request, computed together the first time it is asked."""

    def __init__(self, model: nn.Module, tokenizer: Any, names: Sequence[str | None], batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.names, self.batch_size = model, tokenizer, list(names), batch_size
        self.likelihoods: dict[tuple, list[tuple[float, bool]]] = {}
        self.generations: dict[tuple, list[str]] = {}

    def rows(self, count: int) -> list[str | None]:
        """The adapter of each row when `count` requests are repeated once per adapter."""
        return [name for name in self.names for _ in range(count)]

    @torch.no_grad()
    def loglikelihoods(self, pairs: Sequence[tuple[list[int], list[int]]], index: int) -> list[tuple[float, bool]]:
        """(sum of the continuation's logprobs, whether it is the greedy continuation) per
        (context ids, continuation ids), for adapter `index`."""
        missing = list(
            dict.fromkeys((tuple(c), tuple(t)) for c, t in pairs if (tuple(c), tuple(t)) not in self.likelihoods)
        )
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            seqs = [list(c + t)[:-1] for c, t in batch]  # the last token is predicted, never fed
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs] * len(self.names))
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs] * len(self.names))
            with mixed_batch(self.model, self.rows(len(batch))):
                logprobs = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for i, (context, target) in enumerate(batch):
                answers = []
                for a in range(len(self.names)):
                    row = logprobs[a * len(batch) + i, len(context) - 1 : len(context) - 1 + len(target)]
                    wanted = torch.tensor(target)
                    answers.append(
                        (float(row.gather(1, wanted[:, None]).sum()), bool((row.argmax(-1) == wanted).all()))
                    )
                self.likelihoods[(context, target)] = answers
        return [self.likelihoods[(tuple(c), tuple(t))][index] for c, t in pairs]

    @torch.no_grad()
    def generate(self, requests: Sequence[tuple[str, dict]], index: int) -> list[str]:
        """Greedy continuations of each (context, lm-eval gen_kwargs), cut at the first `until`
        string, for adapter `index`."""
        keys = [(context, repr(sorted(kwargs.items()))) for context, kwargs in requests]
        todo: dict[str, list] = {}  # by generation settings: a batch shares them
        for key, request in dict(zip(keys, requests)).items():
            if key not in self.generations:
                todo.setdefault(key[1], []).append((key, request))
        for group in todo.values():
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                for (key, _), texts in zip(batch, self._generate([r for _, r in batch])):
                    self.generations[key] = texts
        return [self.generations[k][index] for k in keys]

    def _generate(self, requests: list[tuple[str, dict]]) -> list[list[str]]:
        kwargs = requests[0][1]
        until = [u for u in kwargs.get("until", []) if u]
        prompts = [context for context, _ in requests] * len(self.names)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with mixed_batch(self.model, self.rows(len(requests))):
            out = self.model.generate(**enc, max_new_tokens=int(kwargs.get("max_gen_toks", 256)), do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        cut = [min([t.find(u) for u in until if u in t], default=len(t)) for t in texts]
        texts = [t[:c] for t, c in zip(texts, cut)]
        n = len(requests)
        return [[texts[a * n + i] for a in range(len(self.names))] for i in range(n)]


def adapter_lm(scores: Scores, index: int):
    """An lm-eval model (`lm_eval.api.model.TemplateLM`) answering as adapter `index` of `scores`."""
    from lm_eval.api.model import TemplateLM

    class AdapterLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = scores.tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        def tok_encode(self, string: str, **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=False)["input_ids"]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return scores.loglikelihoods([(context, target) for _, context, target in requests], index)

        def generate_until(self, requests, disable_tqdm: bool = False):
            for request in requests:
                if request.args[1].get("do_sample"):
                    raise ValueError("lorakit eval --harness generates greedily; this task asks for sampling")
            return scores.generate([request.args for request in requests], index)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError(
                "rolling loglikelihoods (perplexity tasks) are not supported by lorakit eval --harness; "
                "use lm_eval --model hf --model_args pretrained=...,peft=<adapter>"
            )

    return AdapterLM()


def run_harness(
    model: nn.Module,
    tokenizer: Any,
    names: Sequence[str | None],
    tasks: Sequence[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> list[dict]:
    """lm-eval's results for each adapter in `names` (None: the base) on `tasks`, computed in one pass."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    scores = Scores(model, tokenizer, names, batch_size)
    manager = TaskManager(include_path=include_path)
    return [
        lm_eval.simple_evaluate(
            model=adapter_lm(scores, i),
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )  # fmt: skip
        for i in range(len(names))
    ]
