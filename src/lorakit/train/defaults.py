"""The settings `lorakit train` picks when the user leaves them unset: the learning rate per method,
and for LoRA the rank, alpha, learning rate and adapted matrices per task, as the sweeps in
docs/results.md ("Defaults that need no tuning") chose them. A value the user gives always wins;
`TrainConfig` fills only what was left unset and records what it filled (`defaults_chosen`), which
`lorakit train` prints.

Each entry names the sweep that justifies it. Sizes: the sweeps ran on MiniLM-L6 (22M) for the
encoder tasks and SmolLM2-135M for the decoder ones; nothing in them split by model size, so the
choice is per task (seq2seq follows causal-lm: the same generation objective, not swept). Every
task landed on the same answer: all linear layers of the blocks (PEFT's "all-linear": not the
output head) at lr 2e-3, r=8, alpha 16; LoRA+ (B's lr x16) lost at every lr tried, so it stays off.
"""

from __future__ import annotations

from typing import Any

# LoRA's own settings per task. targets None: the architecture's Wq, Wv (the paper's choice).
LORA_BY_TASK: dict[str, dict[str, Any]] = {
    # defaults_sweep.py, SST-2 (200 steps of 32): all-linear lr 2e-3 83.7 best; Wq,Wv at its best lr 82.9
    "classification": dict(rank=8, alpha=16.0, lr=2e-3, targets="all-linear"),
    # defaults_sweep.py, CoNLL-2003 (300 steps of 16): all-linear lr 2e-3 78.8 F1; Wq,Wv at best 74.9
    "ner": dict(rank=8, alpha=16.0, lr=2e-3, targets="all-linear"),
    # e2e_protocol.py, 960 E2E lines at batch 8: all-linear lr 2e-3 eval loss 1.55 against the anchor's
    # recipe (Wq,Wv lr 1e-3) 1.70
    "causal-lm": dict(rank=8, alpha=16.0, lr=2e-3, targets="all-linear"),
    "seq2seq": dict(rank=8, alpha=16.0, lr=2e-3, targets="all-linear"),
}

# Every other method's learning rate: the values its runs in experiments/ used (the paper's
# baselines: full fine-tuning at BERT-style rates, adapters near LoRA's, prefixes higher).
METHOD_LR: dict[str, float] = {
    "full": 5e-5,
    "top2": 1e-4,
    "bitfit": 5e-3,
    "adapter-h": 1e-3,
    "adapter-l": 1e-3,
    "adapter-p": 1e-3,
    "adapter-drop": 1e-3,
    "prefix-embed": 1e-2,
    "prefix-layer": 5e-3,
}
# rank/alpha of a method that is not LoRA: unused, but kept numbers (8, 16) so configs read alike
UNUSED_LORA = dict(rank=8, alpha=16.0)


def defaults_for(task: str, method: str) -> dict[str, Any]:
    """The settings `lorakit train` uses for `task` and `method` when the user gives none."""
    if method == "lora":
        return dict(LORA_BY_TASK[task])
    return {"lr": METHOD_LR[method], **UNUSED_LORA}


def fill_unset(config: Any, task: str, method: str) -> dict[str, Any]:
    """Set every unset (None) setting of `config` that `defaults_for` covers; returns what it set
    that matters to the run (targets only for LoRA, where None keeps the architecture's Wq, Wv)."""
    chosen = {}
    for name, value in defaults_for(task, method).items():
        if getattr(config, name) is None and value is not None:
            setattr(config, name, value)
            if method == "lora" or name == "lr":
                chosen[name] = value
        elif name == "targets" and config.targets is None and method == "lora":
            chosen[name] = "Wq,Wv"
    return chosen


def describe(chosen: dict[str, Any], task: str, method: str) -> str:
    """One line for the console: what lorakit chose, and where the reason is written down."""
    parts = ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                      for name, value in chosen.items())  # fmt: skip
    return f"defaults for {method} on {task}: {parts} (unset options; why: docs/results.md, 'Defaults')"
