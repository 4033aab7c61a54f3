"""Scoring k adapters on one data set: one pass (`lorakit eval --adapter A --adapter B ...`,
each batch's rows repeated per adapter in a mixed batch) against one run per adapter.

SmolLM2-135M (real weights), k random LoRA adapters (q,v r=8, B drawn so each changes the
model), eval loss on the first --examples lines of the E2E test split (../shared/data/e2e),
batch 8, 2 threads. The scores of the two ways are checked equal; the times are printed and
written to benchmarks/results/eval_many.{md,json}.

    python benchmarks/eval_many.py [--adapters 4] [--examples 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "e2e" / "test.txt"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skip: {DATA} not found (the real data sets are not shipped with lorakit)")
        return
    import lorakit
    from lorakit.models import load_model
    from lorakit.train.api import evaluate, evaluate_adapters, load_trained

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    data = work / "e2e.txt"
    data.write_text("\n".join(DATA.read_text().splitlines()[: args.examples]) + "\n")
    dirs = []
    for i in range(args.adapters):
        model = load_model("smollm2-135m", "AutoModelForCausalLM").model
        torch.manual_seed(i)
        lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                layer.lora_B["default"].normal_(std=0.02)
        dirs.append(lorakit.save_adapter(model, work / f"adapter{i}"))
    trained = load_trained("smollm2-135m", dirs, task="causal-lm")
    names = lorakit.adapter_names(trained.model)
    evaluate_adapters(trained, names[:1], str(data), batch_size=8)  # warm-up
    start = time.perf_counter()
    together = evaluate_adapters(trained, names, str(data), batch_size=8)
    one_pass = time.perf_counter() - start
    start = time.perf_counter()
    alone = []
    for name in names:
        lorakit.set_adapter(trained.model, name)
        alone.append(evaluate(trained, str(data), batch_size=8))
    each = time.perf_counter() - start
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(together, alone))
    result = {"adapters": args.adapters, "examples": args.examples, "one_pass_s": one_pass,
              "one_run_per_adapter_s": each, "speedup": each / one_pass, "max_rel_loss_difference": worst,
              "losses": [r["loss"] for r in together]}  # fmt: skip
    lines = [
        f"# {args.adapters} adapters scored on {args.examples} E2E test lines, SmolLM2-135M, batch 8, 2 threads",
        "",
        "| way | seconds | x |",
        "|---|---|---|",
        f"| one run per adapter | {each:.1f} | 1.00 |",
        f"| one pass, mixed batches (`lorakit eval --adapter A --adapter B ...`) | {one_pass:.1f} "
        f"| {each / one_pass:.2f} |",
        "",
        f"Eval losses equal to {worst:.1e} (relative); `python benchmarks/eval_many.py`",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_many.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "eval_many.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
