"""NER: LoRA with lorakit's defaults against full fine-tuning at an equal training budget, MiniLM on
CoNLL-2003 (issue 18: the gap was about 2 points). The anchors' budget: 20k sentences at batch 16
(1,250 steps), full fine-tuning at lr 5e-5 (the anchors' 87.4 dev F1 with PEFT's stack).

    python experiments/ner_gap.py [--quick] [--seeds N]

Writes experiments/results/ner_gap.{md,json}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CONLL,
    conll_config,
    fmt_ms,
    markdown_table,
    mean_std,
    parse_args,
    require_data,
    run,
    stopwatch,
    wall_note,
    write_results,
)

STEPS, BATCH, FULL_LR = 1250, 16, 5e-5
RUNS = {  # name -> options beyond the data and budget; LoRA gives nothing the defaults cover
    "LoRA, lorakit defaults": dict(method="lora"),
    "LoRA, the defaults but lr 1e-3": dict(method="lora", lr=1e-3),  # is the default lr right at this budget?
    "full fine-tuning, lr 5e-5": dict(method="full", lr=FULL_LR),
}


def config(options: dict, seed: int, quick: bool) -> dict:
    return conll_config(STEPS, BATCH, seed, quick, **options)


def main() -> None:
    args = parse_args(__doc__)
    require_data(CONLL)
    clock = stopwatch()
    seeds = range(args.seeds or 1)
    rows, md = [], []
    for name, options in RUNS.items():
        runs = []
        for seed in seeds:
            c = config(options, seed, args.quick)
            if options["method"] == "lora":  # the key names what the defaults resolve to, and a given lr
                from lorakit.train import TrainConfig

                named = {**TrainConfig(**c).defaults_chosen, **({"lr": c["lr"]} if "lr" in options else {})}
                suffix = "-".join(f"{k}{v}" for k, v in sorted(named.items()))
            else:
                suffix = f"lr{FULL_LR:g}"
            key = ("quick-" if args.quick else "") + f"ner-gap-{options['method']}-{suffix}-s{seed}"
            runs.append(run(key, **c))
        f1, p, r = (mean_std(x["metrics"].get(m) for x in runs) for m in ("f1", "precision", "recall"))
        rows.append({"run": name, "f1": f1[0], "f1_std": f1[1], "params": runs[0]["params_paper"],
                     "train_s": [x["train_runtime_s"] for x in runs]})  # fmt: skip
        md.append([name, f"{runs[0]['params_paper']:,}", fmt_ms(*f1), fmt_ms(*p), fmt_ms(*r),
                   f"{runs[0]['train_runtime_s'] / 60:.1f}"])  # fmt: skip
    table = markdown_table(["run", "trainable params", "dev entity F1", "precision", "recall", "train min"], md)
    wall = clock()
    notes = (
        f"MiniLM (real weights) on CoNLL-2003: {STEPS} steps of batch {BATCH} ({STEPS * BATCH:,} sentences: the "
        f"anchors' budget: one epoch of the 14,041 training sentences and part of a second), max length 128, "
        "full dev set (seqeval entity F1, "
        f"first sub-token labelled), seeds {list(seeds)}, one thread. The anchors (PEFT stack, same budget): full "
        "fine-tuning 87.4, LoRA q,v r=8 84.5 (lr 2e-3). " + wall_note(wall)
    )
    write_results("ner_gap", "NER: LoRA defaults against full fine-tuning", [("CoNLL-2003 dev", table)],
                  {"rows": rows, "wall_s": wall}, notes, args.quick)  # fmt: skip


if __name__ == "__main__":
    main()
