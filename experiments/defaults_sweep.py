"""The sweep behind lorakit's default LoRA settings for the encoder tasks (docs/results.md,
"Defaults"): MiniLM on SST-2 and one sentiment domain (classification) and CoNLL-2003 (NER), LoRA
r=8, alpha 16, the
learning rate from a three-value grid x adapted matrices (Wq,Wv or all linear layers), plus
LoRA+ (B's lr x16) at the middle lr and at 2e-4, beside full fine-tuning (lr 5e-5, the anchors'); one seed, a
quarter of the issue's full budgets.

    python experiments/defaults_sweep.py [--quick]

E2E (causal-lm) has its own sweep in experiments/e2e_protocol.py. Writes
experiments/results/defaults_sweep.{md,json}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CONLL,
    DOMAINS_DIR,
    SST2,
    conll_config,
    domain_config,
    markdown_table,
    parse_args,
    require_data,
    run,
    sst2_config,
    stopwatch,
    wall_note,
    write_results,
)

LRS = (1e-3, 2e-3, 5e-3)
TARGETS = {
    "sst2": {"q,v": ["query", "value"], "all-linear": "all-linear"},
    "conll": {"q,v": ["query", "value"], "all-linear": "all-linear"},
    "domain": {"q,v": ["query", "value"], "all-linear": "all-linear"},
}
DOMAIN, DOMAIN_STEPS = "electronics", 100  # a quarter of methods_long.py's 400 steps of batch 16
SST2_STEPS, CONLL_STEPS, CONLL_BATCH = 200, 300, 16  # quarter budgets: 6.4k sentences / 4.8k sentences
METRIC = {"sst2": "accuracy", "conll": "f1", "domain": "accuracy"}
FULL_LR = 5e-5
LORA_PLUS_LR = 2e-4  # x16 for B: 3.2e-3


def config_for(task: str, quick: bool, **over) -> dict:
    if task == "sst2":
        config = sst2_config(over.pop("method", "lora"), 0, quick, **over)
        config.update(max_steps=4 if quick else SST2_STEPS, max_train_examples=(4 if quick else SST2_STEPS) * 32)
        config.pop("head_lr")  # the head learns at the lr under test, as a user's run without --head-lr does
        return config
    if task == "domain":
        steps = 4 if quick else DOMAIN_STEPS
        config = domain_config(DOMAIN, over.pop("method", "lora"), 0, quick, **over)
        config.update(max_steps=steps, max_train_examples=steps * 16)
        config.pop("head_lr")
        return config
    steps = 4 if quick else CONLL_STEPS
    return conll_config(CONLL_STEPS, CONLL_BATCH, 0, quick, **{"rank": 8, "alpha": 16.0,
                        "max_train_examples": steps * CONLL_BATCH, **over})  # fmt: skip


def grid() -> list[tuple[str, str, float, float]]:
    """(task, targets, lr, LoRA+ ratio) for every run."""
    rows = [(task, t, lr, 1.0) for task in TARGETS for t in TARGETS[task] for lr in LRS]
    rows += [(task, t, LRS[1], 16.0) for task in TARGETS for t in TARGETS[task]]
    rows += [(task, "all-linear", LORA_PLUS_LR, 16.0) for task in TARGETS]  # LoRA+ at its paper's lower lr
    return rows + [(task, "full", FULL_LR, 1.0) for task in TARGETS]


def main() -> None:
    args = parse_args(__doc__)
    require_data(SST2, CONLL, DOMAINS_DIR / DOMAIN)
    clock = stopwatch()
    rows = []
    for task, targets, lr, ratio in grid():
        key = ("quick-" if args.quick else "") + f"defaults-{task}-{targets}-lr{lr:g}-plus{ratio:g}"
        if targets == "full":
            options = dict(method="full", targets=None, lr=lr)
        else:
            options = dict(targets=TARGETS[task][targets], lr=lr, lora_plus_ratio=ratio)
        result = run(key, **config_for(task, args.quick, **options))
        rows.append({"task": task, "targets": targets, "lr": lr, "lora_plus_ratio": ratio,
                     "score": result["metrics"].get(METRIC[task]), "params": result["params_paper"],
                     "train_s": result["train_runtime_s"]})  # fmt: skip
    sections = []
    for task in TARGETS:
        mine = [r for r in rows if r["task"] == task]
        best = max(r["score"] for r in mine)
        sections.append((
            f"{task} ({METRIC[task]})",
            markdown_table(["targets", "lr", "LoRA+ ratio", "trainable params", METRIC[task], "vs best"],
                           [[r["targets"], f"{r['lr']:g}", f"{r['lora_plus_ratio']:g}", f"{r['params']:,}",
                             f"{r['score']:.1f}", f"{r['score'] - best:+.1f}"] for r in mine]),
        ))  # fmt: skip
    wall = clock()
    notes = (
        f"MiniLM (real weights), LoRA r=8 alpha 16, seed 0, the task head trained at the same lr. SST-2: "
        f"{SST2_STEPS} steps of batch 32 (max length 64), full GLUE dev. CoNLL-2003: {CONLL_STEPS} steps of batch "
        f"{CONLL_BATCH} (max length 128), full dev, entity F1 (seqeval). Sentiment domain: {DOMAIN}, "
        f"{DOMAIN_STEPS} steps of batch 16 (max length 64), its dev set. " + wall_note(wall)
    )
    write_results("defaults_sweep", "The sweep behind the default LoRA settings", sections,
                  {"runs": rows, "wall_s": wall}, notes, args.quick)  # fmt: skip


if __name__ == "__main__":
    main()
