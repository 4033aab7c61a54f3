"""DoRA, PiSSA and OLoRA beside plain LoRA, on real data: MiniLM on SST-2 (dev accuracy) and
SmolLM2-135M on E2E NLG (eval loss, BLEU, ROUGE-L). Same steps, data, learning rate, rank and
seeds for every variant; only the variant changes (`--dora`, `--init pissa|olora`).

    python experiments/variants.py [--quick] [--seeds N]

Writes experiments/results/variants.{md,json}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    E2E,
    SST2,
    SST2_BATCH,
    SST2_STEPS,
    fmt_ms,
    key_of,
    markdown_table,
    mean_std,
    parse_args,
    require_data,
    run,
    sst2_config,
    stopwatch,
    wall_note,
    write_results,
)
from methods_e2e import BATCH, GENERATE, LOSS_EXAMPLES, STEPS, e2e_config  # noqa: E402

VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"}}


def suffix(variant: str) -> str:
    return "" if variant == "lora" else f"-{variant}"


def sst2(seeds, quick: bool) -> tuple[str, list[dict]]:
    rows, md = [], []
    for variant, options in VARIANTS.items():
        configs = [sst2_config("lora", s, quick, **options) for s in seeds]
        runs = [run(key_of("sst2", c, quick) + suffix(variant), **c) for c in configs]
        acc = mean_std(r["metrics"].get("accuracy") for r in runs)
        tps = mean_std(r["tokens_per_s"] for r in runs)
        rows.append({"variant": variant, "accuracy": acc[0], "accuracy_std": acc[1],
                     "per_seed": [r["metrics"].get("accuracy") for r in runs], "tokens_per_s": tps[0],
                     "trainable_params": runs[0]["trainable_params"]})  # fmt: skip
        md.append([variant, f"{runs[0]['params_paper']:,}", fmt_ms(*acc), f"{tps[0]:.0f}"])
    return markdown_table(["variant", "trainable params (head excluded)", "dev accuracy %", "train tokens/s"], md), rows


def e2e(seeds, quick: bool) -> tuple[str, list[dict]]:
    rows, md = [], []
    for variant, options in VARIANTS.items():
        configs = [{**e2e_config("lora", s, quick), **options} for s in seeds]
        runs = [
            run(("quick-" if quick else "") + f"e2e-lora{suffix(variant)}-s{s}", **c) for s, c in zip(seeds, configs)
        ]
        loss, bleu, rouge = (mean_std(r["metrics"].get(k) for r in runs) for k in ("loss", "bleu", "rougeL"))
        tps = mean_std(r["tokens_per_s"] for r in runs)
        rows.append({"variant": variant, "loss": loss[0], "loss_std": loss[1], "bleu": bleu[0], "bleu_std": bleu[1],
                     "rougeL": rouge[0], "per_seed_loss": [r["metrics"].get("loss") for r in runs],
                     "tokens_per_s": tps[0], "trainable_params": runs[0]["trainable_params"]})  # fmt: skip
        md.append([variant, f"{runs[0]['trainable_params']:,}", fmt_ms(*loss, digits=3), fmt_ms(*bleu), fmt_ms(*rouge),
                   f"{tps[0]:.0f}"])  # fmt: skip
    columns = ["variant", "trainable params", "eval loss", "BLEU", "ROUGE-L", "train tokens/s"]
    return markdown_table(columns, md), rows


def main() -> None:
    args = parse_args(__doc__)
    require_data(SST2, E2E)
    clock = stopwatch()
    seeds = range(args.seeds or 2)
    print("sst2:")
    sst2_md, sst2_rows = sst2(seeds, args.quick)
    print("e2e:")
    e2e_md, e2e_rows = e2e(seeds, args.quick)
    notes = (
        f"Plain LoRA, DoRA (`--dora`), PiSSA (`--init pissa`) and OLoRA (`--init olora`), r=8, alpha 16, on Wq,Wv, "
        f"seeds {list(seeds)}; everything else the same as the methods experiments. MiniLM (real weights) on SST-2: "
        f"{SST2_STEPS} steps of batch {SST2_BATCH} on a random {SST2_STEPS * SST2_BATCH}-sentence subset, max length "
        f"64, lr 2e-3 (head 2e-3), full GLUE dev (872). SmolLM2-135M (real weights) on E2E: {STEPS} steps of batch "
        f"{BATCH} on a random {STEPS * BATCH}-line subset of train.txt, max length 96, lr 1e-3; eval loss on "
        f"{LOSS_EXAMPLES} test lines, BLEU / ROUGE-L (greedy) on {GENERATE} test MRs. Tokens/s: one thread, rough. "
        + wall_note(clock())
    )
    write_results("variants", "LoRA variants on real data: DoRA, PiSSA, OLoRA", [
        ("MiniLM on SST-2", sst2_md), ("SmolLM2-135M on E2E", e2e_md)],
        {"sst2": sst2_rows, "e2e": e2e_rows}, notes, args.quick)  # fmt: skip


if __name__ == "__main__":
    main()
