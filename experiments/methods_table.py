"""Experiment 1 (the LoRA paper's Tables 2/3, in small): every fine-tuning method on MiniLM
(real weights), on SST-2 and on one sentiment domain, 3 seeds each: trainable parameters (the
paper's count, task head excluded), dev accuracy (mean ± std), training tokens/s, peak memory;
plus inference latency at batch 1 (merged LoRA vs unmerged vs adapters vs prefixes).

    python experiments/methods_table.py [--quick] [--seeds N] [--domain electronics]

Writes experiments/results/methods_table.{md,json,png}. SmolLM2 on E2E: methods_e2e.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DOMAIN_BATCH,
    DOMAIN_STEPS,
    DOMAINS_DIR,
    METHOD_LR,
    SST2,
    SST2_BATCH,
    SST2_STEPS,
    domain_config,
    fmt_int,
    fmt_ms,
    key_of,
    latency,
    latency_table,
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

METHODS = ("full", "top2", "bitfit", "adapter-h", "adapter-l", "prefix-embed", "prefix-layer", "lora")


def table(rows_by_method: dict[str, list[dict]]) -> tuple[str, list[dict]]:
    out, md = [], []
    for method, rows in rows_by_method.items():
        acc = mean_std(r["metrics"].get("accuracy") for r in rows)
        tps = mean_std(r["tokens_per_s"] for r in rows)
        peak = mean_std(r["peak_rss_mb"] for r in rows)
        entry = {
            "method": method,
            "params_paper": rows[0]["params_paper"],
            "params_head": rows[0]["params_head"],
            "accuracy_mean": acc[0],
            "accuracy_std": acc[1],
            "seeds": acc[2],
            "accuracy_per_seed": [r["metrics"].get("accuracy") for r in rows],
            "tokens_per_s": tps[0],
            "peak_rss_mb": peak[0],
            "lr": rows[0]["config"]["lr"],
        }
        out.append(entry)
        md.append(
            [
                method,
                fmt_int(entry["params_paper"]),
                fmt_ms(*acc),
                f"{tps[0]:.0f}",
                f"{peak[0]:.0f}",
                f"{entry['lr']:g}",
            ]
        )
    return markdown_table(
        ["method", "trainable params (paper count)", "dev acc % (mean ± std)", "train tokens/s", "peak RSS MB", "lr"],
        md,
    ), out


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument("--domain", default="electronics"))
    require_data(SST2, DOMAINS_DIR / args.domain)
    clock = stopwatch()
    seeds = range(args.seeds or (1 if args.quick else 3))
    results, sections = {}, []
    for name, make in (
        ("sst2", lambda m, s: sst2_config(m, s, args.quick)),
        (args.domain, lambda m, s: domain_config(args.domain, m, s, args.quick)),
    ):
        print(f"{name}:")
        rows = {m: [run(key_of(name, make(m, s), args.quick), **make(m, s)) for s in seeds] for m in METHODS}
        md, entries = table(rows)
        results[name] = entries
        sections.append((f"MiniLM on {name}", md))
    print("latency:")
    lat = latency("minilm", "classification", ["query", "value"], seq_len=32, reps=20 if args.quick else 200)
    results["latency_minilm_batch1_32tokens"] = lat
    sections.append(
        (
            "Inference latency, MiniLM, batch 1, 32 tokens, 1 thread (median of 200 forwards, round robin)",
            latency_table(lat),
        )
    )
    plot(results, args.domain, args.quick)
    results["wall_s"] = clock()
    notes = (
        f"MiniLM (all-MiniLM-L6-v2, real weights). SST-2: {SST2_STEPS} steps of batch {SST2_BATCH} on a random "
        f"{SST2_STEPS * SST2_BATCH}-sentence subset of the training set, max length 64, full GLUE dev (872). "
        f"{args.domain}: {DOMAIN_STEPS} steps of batch {DOMAIN_BATCH} ({DOMAIN_STEPS * DOMAIN_BATCH} reviews), max "
        f"length 64, full dev. Seeds {list(seeds)}. LoRA r=8 on Wq,Wv (alpha 16); adapters bottleneck 8; "
        f"prefixes 16 positions. Learning rates (untuned): {METHOD_LR}. Every method's new classifier head "
        "trains at head_lr 2e-3. Trainable params: the paper's count (head excluded). Tokens/s: training steps only "
        "(lorakit's own measure), one thread, on a machine shared with other jobs: treat as rough. Peak RSS: "
        "VmHWM of the fresh process of each run (Python + torch + model + optimizer state + activations). "
        + wall_note(results["wall_s"])
    )
    write_results("methods_table", "Methods table (Tables 2/3 in small)", sections, results, notes, args.quick)


def plot(results: dict, domain: str, quick: bool) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, name in zip(axes[:2], ("sst2", domain)):
        entries = results[name]
        for e in entries:
            ax.errorbar(max(e["params_paper"], 1), e["accuracy_mean"], yerr=e["accuracy_std"], fmt="o", capsize=3)
            ax.annotate(
                e["method"],
                (max(e["params_paper"], 1), e["accuracy_mean"]),
                fontsize=8,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (head excluded)")
        ax.set_ylabel("dev accuracy %")
        ax.set_title(f"MiniLM on {name}")
    lat = results["latency_minilm_batch1_32tokens"]
    names = list(lat)
    axes[2].bar(
        range(len(names)),
        [lat[n]["median_ms"] for n in names],
        yerr=[
            [lat[n]["median_ms"] - lat[n]["p10_ms"] for n in names],
            [lat[n]["p90_ms"] - lat[n]["median_ms"] for n in names],
        ],
        capsize=3,
    )
    axes[2].set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    axes[2].set_ylabel("ms per forward (batch 1, 32 tokens)")
    axes[2].set_title("inference latency (median, p10-p90)")
    savefig(fig, "methods_table", quick)


if __name__ == "__main__":
    main()
