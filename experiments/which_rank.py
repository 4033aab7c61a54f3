"""Experiment 3 (the LoRA paper's Table 6): which rank r, for Wq alone and for Wq,Wv,
MiniLM on SST-2. The adapters are kept (runs/experiments/) for subspace.py.

    python experiments/which_rank.py [--quick] [--seeds N]

Writes experiments/results/which_rank.{md,json,png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SST2,
    SST2_BATCH,
    SST2_STEPS,
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

RANKS = (1, 2, 4, 8, 64)
TARGETS = {"Wq": ["query"], "Wq,Wv": ["query", "value"]}


def config_for(targets: str, r: int, seed: int, quick: bool) -> dict:
    return sst2_config("lora", seed, quick, targets=TARGETS[targets], rank=r, alpha=2.0 * r)


def main() -> None:
    args = parse_args(__doc__)
    require_data(SST2)
    clock = stopwatch()
    seeds = range(args.seeds or 2)
    rows = []
    print("sst2:")
    for targets in TARGETS:
        for r in RANKS:
            runs = []
            for s in seeds:
                config = config_for(targets, r, s, args.quick)
                runs.append(run(key_of("sst2", config, args.quick), keep=True, **config))
            acc = mean_std(x["metrics"].get("accuracy") for x in runs)
            rows.append(
                {
                    "targets": targets,
                    "rank": r,
                    "params": runs[0]["params_paper"],
                    "accuracy_mean": acc[0],
                    "accuracy_std": acc[1],
                    "accuracy_per_seed": [x["metrics"].get("accuracy") for x in runs],
                    "adapters": [x["adapter_dir"] for x in runs],
                }
            )
    by = {(r["targets"], r["rank"]): r for r in rows}
    md = markdown_table(
        ["weight types"] + [f"r={r}" for r in RANKS],
        [
            [t] + [fmt_ms(by[t, r]["accuracy_mean"], by[t, r]["accuracy_std"], len(seeds)) for r in RANKS]
            for t in TARGETS
        ],
    )
    plot(rows, args.quick)
    wall = clock()
    notes = (
        f"MiniLM on SST-2, dev accuracy % (mean ± std over seeds {list(seeds)}): {SST2_STEPS} steps of batch "
        f"{SST2_BATCH} on a random {SST2_STEPS * SST2_BATCH}-sentence subset, max length 64, full GLUE dev (872), "
        "lr 2e-3, alpha = 2r (constant alpha/r; the paper fixes alpha instead). " + wall_note(wall)
    )
    write_results(
        "which_rank",
        "Which rank r? (Table 6 in small)",
        [("MiniLM on SST-2", md)],
        {"rows": rows, "wall_s": wall},
        notes,
        args.quick,
    )


def plot(rows: list[dict], quick: bool) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in TARGETS:
        sel = [r for r in rows if r["targets"] == t]
        ax.errorbar(
            [r["rank"] for r in sel],
            [r["accuracy_mean"] for r in sel],
            yerr=[r["accuracy_std"] for r in sel],
            marker="o",
            capsize=3,
            label=t,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(RANKS, [str(r) for r in RANKS])
    ax.set_xlabel("rank r")
    ax.set_ylabel("SST-2 dev accuracy %")
    ax.set_title("Which rank (MiniLM, SST-2)")
    ax.legend()
    savefig(fig, "which_rank", quick)


if __name__ == "__main__":
    main()
