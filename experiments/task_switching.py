"""Experiment 5: task switching on one frozen base. One LoRA adapter per sentiment domain
(books, dvd, electronics, kitchen, airline; MiniLM, r=8 on Wq,Wv), all loaded at once on one
base; each scored on its own domain's dev set and on the other four. Also: the bytes of the
five adapters vs five fully fine-tuned copies, and the time to switch the active adapter
(unmerged: a pointer change; merged: unmerge + merge the weights) vs loading a full copy.

    python experiments/task_switching.py [--quick]

Writes experiments/results/task_switching.{md,json,png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DOMAIN_BATCH,
    DOMAINS,
    DOMAINS_DIR,
    domain_config,
    in_child,
    key_of,
    markdown_table,
    parse_args,
    pyplot,
    require_data,
    run,
    savefig,
    stopwatch,
    wall_note,
    write_results,
)


def _score(dirs: dict[str, str], quick: bool) -> dict:
    import os
    import statistics
    import tempfile
    import time

    import torch
    from safetensors.torch import load_file, save_file

    from lorakit import lora
    from lorakit.models import load_model
    from lorakit.train.api import _adapter_name, evaluate, load_trained

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    trained = load_trained("minilm", list(dirs.values()))
    load_s = time.perf_counter() - t0
    names = {d: _adapter_name(Path(p), i) for i, (d, p) in enumerate(dirs.items())}
    acc = {}
    for d in dirs:
        lora.set_adapter(trained.model, names[d])
        for e in DOMAINS:
            dev = DOMAINS_DIR / e / "dev.tsv"
            if quick:  # the first 32 reviews of the dev set
                import json

                from lorakit.train.data import read_records

                small = Path(tempfile.mkdtemp()) / "dev.jsonl"
                small.write_text("".join(json.dumps(r) + "\n" for r in read_records(str(dev))[:32]), encoding="utf-8")
                dev = small
            acc[d, e] = evaluate(trained, str(dev))["accuracy"]

    def timed(fn, reps):
        times = []
        for i in range(reps):
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    order = [names[d] for d in dirs]
    unmerged_ms = timed(lambda i: lora.set_adapter(trained.model, order[i % len(order)]), 200)
    lora.set_adapter(trained.model, order[0])
    lora.merge(trained.model)
    merged_ms = timed(lambda i: lora.set_adapter(trained.model, order[i % len(order)]), 25)  # re-merges
    lora.unmerge(trained.model)
    # a full fine-tuned copy: the whole base's weights, saved and loaded like an adapter
    full = load_model("minilm", "AutoModelForSequenceClassification", label_names=["0", "1"]).model
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, path)
        full_bytes = os.path.getsize(path)
        full_ms = timed(lambda i: full.load_state_dict(load_file(path)), 10)
    adapter_bytes = {
        d: sum(f.stat().st_size for f in Path(p).iterdir() if f.suffix == ".safetensors") for d, p in dirs.items()
    }
    return {
        "accuracy": {f"{d}->{e}": v for (d, e), v in acc.items()},
        "load_base_and_5_adapters_s": load_s,
        "switch_unmerged_ms": unmerged_ms,
        "switch_merged_ms": merged_ms,
        "load_full_copy_ms": full_ms,
        "adapter_bytes": adapter_bytes,
        "full_copy_bytes": full_bytes,
    }


STEPS = 100  # ~1 epoch of a domain's 1,700 reviews (the methods table's 40 steps leave LoRA under-trained)


def switch_config(domain: str, quick: bool) -> dict:
    steps = 4 if quick else STEPS
    return domain_config(domain, "lora", 0, quick, max_steps=steps, max_train_examples=steps * DOMAIN_BATCH)


def main() -> None:
    args = parse_args(__doc__)
    require_data(*(DOMAINS_DIR / d for d in DOMAINS))
    clock = stopwatch()
    print("domains:")
    configs = {d: switch_config(d, args.quick) for d in DOMAINS}
    rows = {d: run(key_of(f"switch-{d}", c, args.quick), keep=True, **c) for d, c in configs.items()}
    print("scoring every adapter on every domain ...")
    out, peak, _ = in_child(_score, {d: r["adapter_dir"] for d, r in rows.items()}, args.quick)
    acc = out["accuracy"]
    matrix = markdown_table(
        ["adapter \\ dev set"] + list(DOMAINS),
        [[d] + [("**%.1f**" if d == e else "%.1f") % acc[f"{d}->{e}"] for e in DOMAINS] for d in DOMAINS],
    )
    total = sum(out["adapter_bytes"].values())
    sizes = markdown_table(
        ["what", "bytes", "ratio"],
        [
            ["5 LoRA adapters (A, B of Wq,Wv + each one's classifier head), safetensors", f"{total:,}", "1"],
            [
                "5 full fine-tuned copies of MiniLM (fp32 safetensors)",
                f"{5 * out['full_copy_bytes']:,}",
                f"{5 * out['full_copy_bytes'] / total:.0f}x",
            ],
        ],
    )
    times = markdown_table(
        ["operation", "time"],
        [
            ["load base + 5 adapters (once)", f"{out['load_base_and_5_adapters_s']:.2f} s"],
            ["switch adapter, unmerged (set_adapter)", f"{out['switch_unmerged_ms']:.3f} ms"],
            ["switch adapter, merged (unmerge old + merge new into W)", f"{out['switch_merged_ms']:.2f} ms"],
            [
                "switch by loading a full fine-tuned copy (safetensors from disk -> load_state_dict)",
                f"{out['load_full_copy_ms']:.1f} ms",
            ],
        ],
    )
    own = [acc[f"{d}->{d}"] for d in DOMAINS]
    other = [acc[f"{d}->{e}"] for d in DOMAINS for e in DOMAINS if d != e]
    out.update(
        {
            "own_domain_mean": sum(own) / len(own),
            "other_domain_mean": sum(other) / len(other),
            "peak_rss_mb_scoring": peak,
            "train": {
                d: {k: r[k] for k in ("metrics", "tokens_per_s", "peak_rss_mb", "params_paper")}
                for d, r in rows.items()
            },
        }
    )
    plot(acc, args.quick)
    wall = clock()
    out["wall_s"] = wall
    notes = (
        f"MiniLM, one LoRA adapter (r=8 on Wq,Wv, alpha 16, lr 2e-3, seed 0) per domain: {STEPS} steps of "
        f"batch {DOMAIN_BATCH} ({STEPS * DOMAIN_BATCH} random training reviews), max length 64. All five "
        "loaded at once on one base (lorakit.train.api.load_trained), activated in turn with "
        "lorakit.lora.set_adapter and scored on every domain's full dev set. Own-domain mean "
        f"{out['own_domain_mean']:.1f}%, other-domain mean {out['other_domain_mean']:.1f}%. Switch times: "
        "median, 1 thread, shared machine. " + wall_note(wall)
    )
    write_results(
        "task_switching",
        "Task switching on one base",
        [
            ("Dev accuracy %: each domain's adapter (rows) on each domain (columns)", matrix),
            ("Storage", sizes),
            ("Switching", times),
        ],
        out,
        notes,
        args.quick,
    )


def plot(acc: dict, quick: bool) -> None:
    import numpy as np

    plt = pyplot()
    m = np.array([[acc[f"{d}->{e}"] for e in DOMAINS] for d in DOMAINS])
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(m, cmap="viridis")
    for i in range(len(DOMAINS)):
        for j in range(len(DOMAINS)):
            ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", color="w" if m[i, j] < m.mean() else "k")
    ax.set_xticks(range(len(DOMAINS)), DOMAINS)
    ax.set_yticks(range(len(DOMAINS)), DOMAINS)
    ax.set_xlabel("dev set")
    ax.set_ylabel("adapter trained on")
    ax.set_title("Task switching: dev accuracy %")
    fig.colorbar(im)
    savefig(fig, "task_switching", quick)


if __name__ == "__main__":
    main()
