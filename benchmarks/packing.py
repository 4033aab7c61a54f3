"""Packed (padding-free) vs padded causal-LM batches, side by side in one process: SmolLM2-135M,
LoRA q,v r=8, bf16, batch 8, forward + backward per micro-batch, the two layouts interleaved
batch by batch (alternating which goes first). Two length profiles:

    e2e     the E2E rows as they are (lengths 50-128, about 20% padding in a padded batch)
    mixed   30% of rows two E2E rows back to back (cut at 128), the rest cut to 24..len tokens
            (a wider spread, as in instruction data: about 40% padding)

    python benchmarks/packing.py [--batches 30]

Results: benchmarks/results/packing.json and .md. Needs ../shared/data/e2e (skips without it).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DATA, RESULTS, examples  # noqa: E402


def length_profiles(encoded: list, seed: int = 1) -> dict[str, list]:
    from lorakit.train.batching import Encoded

    rng = random.Random(seed)
    mixed = []
    for i, e in enumerate(encoded):
        if rng.random() < 0.3:
            f = encoded[(i + 1) % len(encoded)]
            mixed.append(Encoded((e.input_ids + f.input_ids)[:128], (e.labels + f.labels)[:128]))
        else:
            keep = rng.randint(24, len(e))
            mixed.append(Encoded(e.input_ids[:keep], e.labels[:keep]))
    return {"e2e": encoded, "mixed": mixed}


def step_seconds(model, task, batch_rows: list, packed: bool) -> float:
    from lorakit.train.batching import pack
    from lorakit.train.packing import use_packed_attention

    use_packed_attention(model, packed)
    batch = pack(batch_rows) if packed else task.collate(batch_rows)  # each layout forced, whatever the padding
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.loss_sum(model(**task.model_inputs(batch, model)), batch)
    loss.backward()
    elapsed = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skip: {DATA} not found (the E2E data set is not shipped with lorakit)")
        return
    from lorakit import lora
    from lorakit.models import load_model, load_tokenizer
    from lorakit.train.packing import packing_support
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import hold_frozen_in_bf16

    torch.set_num_threads(2)
    model = load_model("smollm2-135m", "AutoModelForCausalLM").model
    model.set_attn_implementation("eager")  # lorakit's default for bf16 on CPU
    lora.inject(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert packing_support(model, 128) is None
    hold_frozen_in_bf16(model)
    task = make_task("causal-lm", load_tokenizer("smollm2-135m"), 128)
    results = {"batches": args.batches, "batch_size": 8, "torch": torch.__version__, "profiles": {}}
    for profile, rows in length_profiles(task.encode_all(examples("train", 8 * args.batches))).items():
        times = {"padded": [], "packed": []}
        for k in range(args.batches):
            batch_rows = rows[8 * k : 8 * k + 8]
            for layout in ("packed", "padded") if k % 2 else ("padded", "packed"):
                times[layout].append(step_seconds(model, task, batch_rows, layout == "packed"))
        real = sum(len(e) for e in rows[: 8 * args.batches])
        padded_tokens = sum(8 * max(len(e) for e in rows[8 * k : 8 * k + 8]) for k in range(args.batches))
        warm = {k: v[2:] for k, v in times.items()}  # the first steps warm the kernels up
        results["profiles"][profile] = {
            "padding_share": 1 - real / padded_tokens,
            **{f"{k}_median_s": statistics.median(v) for k, v in warm.items()},
            "packed_over_padded_time": sum(warm["packed"]) / sum(warm["padded"]),
        }
        print(profile, results["profiles"][profile], flush=True)
    write_results(results)


def write_results(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "packing.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# Packed vs padded batches: SmolLM2-135M, LoRA q,v r=8, bf16, batch 8, {results['batches']} batches, "
        "forward + backward",
        "",
        "| length profile | padding in a padded batch | padded s/step (median) | packed s/step (median) "
        "| packed time / padded |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["profiles"].items():
        lines.append(
            f"| {name} | {r['padding_share']:.0%} | {r['padded_median_s']:.3f} | {r['packed_median_s']:.3f} | "
            f"{r['packed_over_padded_time']:.3f} |"
        )
    (RESULTS / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
