"""Shared pieces of the benchmark suite: the models, the configurations, and timing.

Timings on a shared 2-core machine are noisy, so every comparison is measured side by side in
one process: configurations are interleaved step by step after a warm-up, and we report the
median and the spread (interquartile range) of repeated steps, and ratios between them.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))


@dataclass
class Spec:
    """A benchmark model: how to build it, a batch, and its LoRA targets."""

    name: str
    build: Callable[[], nn.Module]
    batch: int
    seq: int
    qv: list[str]
    kind: str  # "lm" (causal LM) or "cls" (sequence classification)
    vocab: int = 1000


def gpt2_shaped(layers: int = 6, width: int = 512) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=8,
        vocab_size=8192,
        n_positions=256,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def minilm() -> nn.Module:
    from lorakit.models import load_model

    model = load_model("minilm", "AutoModelForSequenceClassification", label_names=["0", "1"]).model
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def smollm2() -> nn.Module:
    from lorakit.models import load_model

    return load_model("smollm2-135m", "AutoModelForCausalLM").model


SPECS = {
    "gpt2": Spec("GPT-2-shaped 6L/512 (random)", gpt2_shaped, 8, 128, ["c_attn"], "lm", 8192),
    "minilm": Spec("MiniLM-L6 seq-cls (real)", minilm, 8, 128, ["query", "value"], "cls", 30522),
    "smollm2": Spec("SmolLM2-135M (real)", smollm2, 4, 128, ["q_proj", "v_proj"], "lm", 49152),
}


def batch_for(spec: Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, spec.vocab, (spec.batch, spec.seq), generator=g)
    labels = ids.clone() if spec.kind == "lm" else torch.randint(0, 2, (spec.batch,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# -- configurations of one model -------------------------------------------------------------
def configure(base: nn.Module, spec: Spec, how: str) -> nn.Module:
    """A fresh copy of `base` set up as `how`: full | floor | peft-qv | lorakit-qv | peft-all | lorakit-all."""
    model = copy.deepcopy(base)
    if how == "full":
        model.requires_grad_(True)
        return model
    if how == "floor":  # every weight frozen; backward still computes activation grads
        model.requires_grad_(False)
        return FloorModel(model)
    targets = spec.qv if how.endswith("qv") else "all-linear"
    head = ["score", "classifier"] if spec.kind == "cls" else None
    if how.startswith("peft"):
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=head)
        return peft.get_peft_model(model, config)
    import lorakit

    return lorakit.inject(
        model,
        lorakit.LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=targets,
            modules_to_save=[h for h in (head or []) if hasattr(model, h)] or None,
        ),
    )


class FloorModel(nn.Module):
    """The frozen floor: input embeddings require grad, so backward runs through every layer
    (activation gradients only): the cost no adapter-only training can go below."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None):
        embeds = self.model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


# -- timing ------------------------------------------------------------------------------------
@dataclass
class Timer:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])

    def spread(self, key: str) -> float:
        """Interquartile range relative to the median."""
        values = sorted(self.samples[key])
        if len(values) < 4:
            return 0.0
        q1, q3 = values[len(values) // 4], values[(3 * len(values)) // 4]
        return (q3 - q1) / max(statistics.median(values), 1e-12)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleave(runs: dict[str, Callable[[], dict[str, float]]], repeats: int, warmup: int = 2) -> Timer:
    """Call every run `warmup` times, then `repeats` rounds of each in turn; each call
    returns {phase: seconds}, recorded under "<run>/<phase>"."""
    timer = Timer()
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            for phase, seconds in fn().items():
                timer.add(f"{name}/{phase}", seconds)
    return timer


def rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM). Not ru_maxrss: Linux carries that
    over from the parent across fork + exec, so every child would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
