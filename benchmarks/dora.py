"""DoRA's training step against plain LoRA's, lorakit against PEFT.

One training step (forward + backward + AdamW on the adapter) of SmolLM2-135M (real weights,
4 x 128 tokens, r=8 alpha 16), for lorakit LoRA, lorakit DoRA, PEFT LoRA and PEFT DoRA on the
same base, interleaved step by step after 2 warm-ups (common.interleave); median of --repeats.
Targets: the attention q,v (the default) and all-linear (every projection, DoRA's usual setup).
--bf16 holds the frozen base in bf16 and runs under autocast, as `lorakit train --bf16` does.

    python benchmarks/dora.py [--repeats 10] [--bf16]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SPECS, batch_for, interleave, timed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("lorakit-lora", "lorakit-dora", "peft-lora", "peft-dora")


def configure(base: torch.nn.Module, row: str, targets, bf16: bool) -> torch.nn.Module:
    model = copy.deepcopy(base)
    dora = row.endswith("dora")
    if row.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=dora))
    else:
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=dora))
    if bf16:  # the frozen base in bf16, the adapter fp32 (as the trainer holds them)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model.train()


def step_fn(model: torch.nn.Module, batch: dict, bf16: bool):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> dict[str, float]:
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds, _ = timed(run)
        return {"step": seconds}

    return step


def measure(repeats: int, bf16: bool) -> dict:
    spec = SPECS["smollm2"]
    base = spec.build()
    batch = batch_for(spec)
    results = {}
    for label, targets in (("q,v", spec.qv), ("all-linear", "all-linear")):
        runs = {row: step_fn(configure(base, row, targets, bf16), batch, bf16) for row in ROWS}
        timer = interleave(runs, repeats)
        results[label] = {row: {"ms": timer.median(f"{row}/step") * 1000, "iqr": timer.spread(f"{row}/step")}
                          for row in ROWS}  # fmt: skip
        print(label, {row: round(v["ms"]) for row, v in results[label].items()}, flush=True)
        del runs
    return results


def write(results: dict, bf16: bool, repeats: int) -> None:
    dtype = "bf16 base, autocast" if bf16 else "fp32"
    lines = [
        f"# DoRA's training step, SmolLM2-135M, 4 x 128 tokens, r=8, {dtype} (torch {torch.__version__}, 2 threads)",
        "",
        f"Median ms of {repeats} interleaved steps (forward + backward + AdamW); `python benchmarks/dora.py"
        + (" --bf16`" if bf16 else "`"),
        "",
        "| targets | lorakit LoRA | lorakit DoRA | DoRA / LoRA | PEFT LoRA | PEFT DoRA | PEFT DoRA / lorakit DoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['lorakit-lora']['ms']:.0f} | {r['lorakit-dora']['ms']:.0f} "
            f"| **{r['lorakit-dora']['ms'] / r['lorakit-lora']['ms']:.2f}** | {r['peft-lora']['ms']:.0f} "
            f"| {r['peft-dora']['ms']:.0f} | **{r['peft-dora']['ms'] / r['lorakit-dora']['ms']:.2f}** |"
        )
    name = "dora_bf16" if bf16 else "dora"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    write(measure(args.repeats, args.bf16), args.bf16, args.repeats)


if __name__ == "__main__":
    main()
