"""Experiment 2 (the LoRA paper's Table 5): which weight matrices to adapt under a fixed
budget of LoRA parameters, MiniLM on SST-2. The budget is that of r=8 on one matrix type:
r=8 for one type, r=4 for two, r=2 for all four (as the paper does with 18M parameters).

    python experiments/which_weights.py [--quick] [--seeds N]

Writes experiments/results/which_weights.{md,json,png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SST2,
    SST2_BATCH,
    SST2_STEPS,
    fmt_int,
    fmt_ms,
    key_of,
    markdown_table,
    mean_std,
    parse_args,
    pyplot,
    require_data,
    run,
    savefig,
    sst2_config,
    stopwatch,
    wall_note,
    write_results,
)

MATRIX = {"Wq": "query", "Wk": "key", "Wv": "value", "Wo": "attention.output.dense"}
CONFIGS = [("Wq",), ("Wk",), ("Wv",), ("Wo",), ("Wq", "Wk"), ("Wq", "Wv"), ("Wq", "Wk", "Wv", "Wo")]
BUDGET_RANK = 8  # rank x number of types is constant


def main() -> None:
    args = parse_args(__doc__)
    require_data(SST2)
    clock = stopwatch()
    seeds = range(args.seeds or (1 if args.quick else 2))
    rows, md = [], []
    print("sst2:")
    for types in CONFIGS:
        r = BUDGET_RANK // len(types)
        runs = []
        for s in seeds:
            config = sst2_config("lora", s, args.quick, targets=[MATRIX[t] for t in types], rank=r, alpha=2.0 * r)
            runs.append(run(key_of("sst2", config, args.quick), **config))
        acc = mean_std(x["metrics"].get("accuracy") for x in runs)
        rows.append(
            {
                "types": list(types),
                "rank": r,
                "params": runs[0]["params_paper"],
                "accuracy_mean": acc[0],
                "accuracy_std": acc[1],
                "accuracy_per_seed": [x["metrics"].get("accuracy") for x in runs],
            }
        )
        md.append([", ".join(types), r, fmt_int(runs[0]["params_paper"]), fmt_ms(*acc)])
    plot(rows, args.quick)
    wall = clock()
    notes = (
        f"MiniLM on SST-2: {SST2_STEPS} steps of batch {SST2_BATCH} on a random {SST2_STEPS * SST2_BATCH}-sentence "
        f"subset, max length 64, full GLUE dev (872), seeds {list(seeds)}, lr 2e-3, alpha = 2r (so alpha/r = 2 "
        "throughout; the paper instead fixes alpha to the first r tried), all 6 layers. Budget: "
        f"{BUDGET_RANK} x 384 x 2 x 6 layers = {BUDGET_RANK * 384 * 2 * 6:,} LoRA parameters in every row. "
        + wall_note(wall)
    )
    write_results(
        "which_weights",
        "Which weight matrices? (Table 5 in small)",
        [
            (
                "MiniLM on SST-2, fixed parameter budget",
                markdown_table(["weight types", "rank r", "LoRA params", "dev acc % (mean ± std)"], md),
            )
        ],
        {"rows": rows, "wall_s": wall},
        notes,
        args.quick,
    )


def plot(rows: list[dict], quick: bool) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [",".join(r["types"]) + f"\nr={r['rank']}" for r in rows]
    ax.bar(range(len(rows)), [r["accuracy_mean"] for r in rows], yerr=[r["accuracy_std"] for r in rows], capsize=3)
    lo = min(r["accuracy_mean"] - r["accuracy_std"] for r in rows)
    ax.set_ylim(max(0, lo - 5), min(100, max(r["accuracy_mean"] + r["accuracy_std"] for r in rows) + 2))
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("SST-2 dev accuracy %")
    ax.set_title("Which weights, fixed LoRA budget (MiniLM)")
    savefig(fig, "which_weights", quick)


if __name__ == "__main__":
    main()
