"""Experiment 1, generation half (the LoRA paper's Table 3, in small): SmolLM2-135M on E2E NLG
with each method that applies to a LLaMA-style decoder: trainable parameters, eval loss (all
methods) and BLEU / ROUGE-L of greedy generations (not for the prefix methods: this table keeps the
runs it was first made with, from before prefix-layer generated), training tokens/s, peak memory;
plus inference latency at batch 1.

    python experiments/methods_e2e.py [--quick] [--seeds N]

BitFit is left out: LLaMA-style models have no bias terms. Writes
experiments/results/methods_e2e.{md,json,png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    E2E,
    fmt_int,
    fmt_ms,
    latency,
    latency_table,
    markdown_table,
    mean_std,
    parse_args,
    pyplot,
    require_data,
    run,
    savefig,
    stopwatch,
    wall_note,
    write_results,
)

LR = {
    "lora": 1e-3,
    "full": 5e-5,
    "top2": 1e-4,
    "adapter-h": 1e-3,
    "adapter-l": 1e-3,
    "prefix-embed": 1e-2,
    "prefix-layer": 5e-3,
}
METHODS = tuple(LR)
STEPS, BATCH, GENERATE, LOSS_EXAMPLES = 30, 8, 24, 96
LATENCY_TOKENS, LATENCY_REPS = 32, 40


def e2e_config(method: str, seed: int, quick: bool) -> dict:
    steps = 3 if quick else STEPS
    return dict(
        model="smollm2-135m",
        task="causal-lm",
        data=str(E2E / "train.txt"),
        eval_data=str(E2E / "test.txt"),
        method=method,
        targets=["q_proj", "v_proj"] if method == "lora" else None,
        rank=8,
        alpha=16.0,
        lr=LR[method],
        batch_size=BATCH,
        max_length=96,
        max_steps=steps,
        max_train_examples=steps * BATCH,
        eval_generate=0 if method.startswith("prefix") else (4 if quick else GENERATE),
        eval_loss_examples=16 if quick else LOSS_EXAMPLES,
        eval_batch_size=16,
        max_new_tokens=48,
        adapter_size=8,
        prefix_length=16,
        seed=seed,
    )


def main() -> None:
    args = parse_args(__doc__)
    require_data(E2E)
    clock = stopwatch()
    seeds = range(args.seeds or 1)
    rows, md = [], []
    print("e2e:")
    for m in METHODS:
        runs = [run(("quick-" if args.quick else "") + f"e2e-{m}-s{s}", **e2e_config(m, s, args.quick)) for s in seeds]
        loss = mean_std(r["metrics"].get("loss") for r in runs)
        bleu = mean_std(r["metrics"].get("bleu") for r in runs)
        rouge = mean_std(r["metrics"].get("rougeL") for r in runs)
        tps = mean_std(r["tokens_per_s"] for r in runs)
        peak = mean_std(r["peak_rss_mb"] for r in runs)
        rows.append(
            {
                "method": m,
                "params_paper": runs[0]["params_paper"],
                "loss": loss[0],
                "loss_std": loss[1],
                "bleu": bleu[0],
                "bleu_std": bleu[1],
                "rougeL": rouge[0],
                "seeds": loss[2],
                "tokens_per_s": tps[0],
                "peak_rss_mb": peak[0],
                "lr": LR[m],
            }
        )
        md.append(
            [
                m,
                fmt_int(runs[0]["params_paper"]),
                fmt_ms(*loss, digits=3),
                fmt_ms(*bleu),
                fmt_ms(*rouge),
                f"{tps[0]:.0f}",
                f"{peak[0]:.0f}",
                f"{LR[m]:g}",
            ]
        )
    table = markdown_table(
        ["method", "trainable params", "eval loss", "BLEU", "ROUGE-L", "train tokens/s", "peak RSS MB", "lr"], md
    )
    print("latency:")
    reps = 5 if args.quick else LATENCY_REPS
    lat = latency("smollm2-135m", "causal-lm", ["q_proj", "v_proj"], seq_len=LATENCY_TOKENS, reps=reps)
    plot(rows, lat, args.quick)
    wall = clock()
    notes = (
        f"SmolLM2-135M (real weights) on E2E NLG: {STEPS} steps of batch {BATCH} on a random {STEPS * BATCH}-line "
        f"subset of `train.txt` (the official validation split), max length 96, seeds {list(seeds)}. Eval loss on "
        f"{LOSS_EXAMPLES} random lines of `test.txt`; BLEU / ROUGE-L (greedy, <= 48 new tokens) on {GENERATE} "
        "test meaning representations scored against all their references. Prefix methods: loss only "
        "(lorakit's prefix models did not generate when this table ran), so eval loss is the metric that "
        "covers every method. LoRA "
        "r=8 on Wq,Wv (alpha 16); adapters bottleneck 8; prefixes 16 positions. BitFit: not applicable (no "
        f"biases). Learning rates (untuned): {LR}. " + wall_note(wall)
    )
    write_results(
        "methods_e2e",
        "Methods on E2E (Table 3 in small)",
        [
            ("SmolLM2-135M on E2E", table),
            (
                f"Inference latency, SmolLM2-135M, batch 1, {LATENCY_TOKENS} tokens, 1 thread "
                f"(median of {reps} forwards, round robin)",
                latency_table(lat),
            ),
        ],
        {"e2e": rows, f"latency_smollm2_batch1_{LATENCY_TOKENS}tokens": lat, "wall_s": wall},
        notes,
        args.quick,
    )


def plot(rows: list[dict], lat: dict, quick: bool) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        axes[0].errorbar(r["params_paper"], r["loss"], yerr=r["loss_std"], fmt="o", capsize=3)
        label = r["method"] + (f" (BLEU {r['bleu']:.1f})" if r["bleu"] == r["bleu"] else "")
        axes[0].annotate(label, (r["params_paper"], r["loss"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("trainable parameters")
    axes[0].set_ylabel("E2E eval loss (lower is better)")
    axes[0].set_title("SmolLM2-135M on E2E")
    names = list(lat)
    axes[1].bar(
        range(len(names)),
        [lat[n]["median_ms"] for n in names],
        yerr=[
            [lat[n]["median_ms"] - lat[n]["p10_ms"] for n in names],
            [lat[n]["p90_ms"] - lat[n]["median_ms"] for n in names],
        ],
        capsize=3,
    )
    axes[1].set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    axes[1].set_ylabel(f"ms per forward (batch 1, {LATENCY_TOKENS} tokens)")
    axes[1].set_title("inference latency (median, p10-p90)")
    savefig(fig, "methods_e2e", quick)


if __name__ == "__main__":
    main()
