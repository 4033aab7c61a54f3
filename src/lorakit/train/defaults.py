"""The settings `lorakit train` picks when the user leaves them unset: the learning rate per method,
and for LoRA the rank, alpha, learning rate and adapted matrices per task, as the sweeps in
docs/results.md ("Defaults that need no tuning") chose them. A value the user gives always wins;
`TrainConfig` fills only what was left unset and records what it filled (`defaults_chosen`), which
`lorakit train` prints.

Each entry names the runs that justify it. Sizes: the sweeps ran on MiniLM-L6 (22M) for the
encoder tasks and SmolLM2-135M for the decoder ones; nothing in them split by model size, so the
choice is per task (seq2seq follows causal-lm: the same generation objective, not swept). Every
task adapts all linear layers of the blocks (PEFT's "all-linear": not the output head) at r=8,
alpha 16; LoRA+ (B's lr x16) lost at every lr tried on the encoders and tied on E2E, so it stays
off. The learning rate is the one task setting the runs split on: at the budgets where orderings
settle (hundreds of steps), classification does best at 1e-3 and NER at 2e-3 (docs/results.md,
"Defaults"). The other methods take one learning rate each, from the encoders' grids, except where
E2E's grid chose otherwise for the generation tasks.
"""

from __future__ import annotations

from typing import Any

# LoRA's own settings per task. targets None: the architecture's Wq, Wv (the paper's choice).
LORA_BY_TASK: dict[str, dict[str, Any]] = {
    # methods_long.py, lr grid then 2 seeds: SST-2 800 steps of 32: lr 1e-3 88.0, lr 2e-3 86.7 (full FT 88.5);
    # electronics 400 of 16: 1e-3 90.3, 2e-3 90.0 (full 89.5). defaults_sweep.py: all-linear beats Wq,Wv.
    "classification": dict(rank=8, alpha=16.0, lr=1e-3, targets="all-linear"),
    # ner_gap.py, CoNLL-2003 1,250 steps of 16, 2 seeds: lr 2e-3 87.3, lr 1e-3 86.7; full FT 87.6
    "ner": dict(rank=8, alpha=16.0, lr=2e-3, targets="all-linear"),
    # e2e_protocol.py, 960 E2E lines at batch 8: all-linear lr 2e-3 eval loss 1.55 against the anchor's
    # recipe (Wq,Wv lr 1e-3) 1.70; on top of it rank 16, batch 4, OLoRA, PiSSA and LoRA+ gained no BLEU
    "causal-lm": dict(rank=8, alpha=16.0, lr=2e-3, targets="all-linear"),
    "seq2seq": dict(rank=8, alpha=16.0, lr=2e-3, targets="all-linear"),
}

# Every other method's learning rate: the value methods_long.py's grid (1e-4, 1e-3, 1e-2; SST-2 and
# electronics) chose where both agreed and it held at the full budget; else the stabler one, and
# full fine-tuning at the anchors' BERT-style 5e-5 (the grid's 1e-4 won there; 5e-5 was not on it).
METHOD_LR: dict[str, float] = {
    "full": 5e-5,
    "top2": 1e-3,  # chosen on both
    "bitfit": 5e-3,  # the grids disagree (SST-2 1e-2; electronics 1e-3, where 1e-2 diverged): between them
    "adapter-h": 1e-3,  # SST-2's grid picked 1e-2, which diverged at the full budget; the domain's 1e-3
    "adapter-l": 1e-3,
    "adapter-p": 1e-2,  # chosen on both, and held at the full budget (84.7, 89.3)
    "adapter-drop": 1e-3,  # the domain's 1e-2 diverged on one seed of two
    "prefix-embed": 1e-2,  # chosen on both
    "prefix-layer": 1e-2,  # chosen on both
}
# Where the generation tasks' grid chose otherwise (methods_long.py --part e2e, SmolLM2-135M, 146 steps,
# dev loss; both seeds then held at one epoch). Full fine-tuning keeps 5e-5: E2E's grid picked 1e-4,
# its lowest value. seq2seq follows causal-lm, as for LoRA.
_GENERATION_LR = {"adapter-h": 1e-2, "adapter-l": 1e-2}
METHOD_LR_BY_TASK: dict[str, dict[str, float]] = {"causal-lm": _GENERATION_LR, "seq2seq": _GENERATION_LR}
# rank/alpha of a method that is not LoRA: unused, but kept numbers (8, 16) so configs read alike
UNUSED_LORA = dict(rank=8, alpha=16.0)


def defaults_for(task: str, method: str) -> dict[str, Any]:
    """The settings `lorakit train` uses for `task` and `method` when the user gives none."""
    if method == "lora":
        return dict(LORA_BY_TASK[task])
    lr = METHOD_LR_BY_TASK.get(task, {}).get(method, METHOD_LR[method])
    return {"lr": lr, **UNUSED_LORA}


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
