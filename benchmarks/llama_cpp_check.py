"""llama.cpp runs what `lorakit export --format gguf` writes: SmolLM2-135M's shipped Q4_1 GGUF
with an exported adapter, in llama.cpp (llama-cpp-python) against lorakit on the same Q4_1
blocks (`--quantize gguf`, fp32 compute) with the same adapter.

Reported: next-token logits on 20 E2E prompts (max |difference| / max |logit|, top-1 agreement)
and greedy continuations compared token by token, with and without the adapter, so the
base-only agreement is the yardstick for what the adapter adds. The adapter is trained here
(LoRA q,v r=8, 60 steps on E2E) unless --adapter names one.

    python benchmarks/llama_cpp_check.py [--adapter DIR] [--tokens 16]

Needs llama-cpp-python (built with the flags in ../shared/notes/engines.md) and ../shared/data/e2e.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def train_adapter(out: Path) -> Path:
    from e2e import examples

    from lorakit.train import TrainConfig, train

    rows = examples("train", 480)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(model="smollm2-135m", task="causal-lm", data=str(data), output=str(out / "adapter"),
                         targets=["q_proj", "v_proj"], rank=8, alpha=16, lr=1e-3, batch_size=8, max_steps=60,
                         max_length=128, bf16=True, eval_before=False)  # fmt: skip
    train(config, callbacks=[])
    return out / "adapter"


def compare(adapter: Path, prompts: list[str], tokens: int) -> dict:
    import llama_cpp

    from lorakit.export import export_adapter
    from lorakit.models import gguf_source, load_tokenizer
    from lorakit.train.api import load_base

    gguf_lora = export_adapter(adapter, "gguf", adapter.parent / "adapter.gguf", model="smollm2-135m")[0]
    tokenizer = load_tokenizer("smollm2-135m")
    ours = load_base("smollm2-135m", "causal-lm", quantize="gguf").eval()
    import lorakit

    lorakit.load_adapter(ours, adapter)
    base_file = str(gguf_source("smollm2-135m"))
    results, continuations = {}, {}
    for with_adapter in (False, True):
        engine = llama_cpp.Llama(model_path=base_file, lora_path=str(gguf_lora) if with_adapter else None,
                                 n_ctx=512, logits_all=True, verbose=False, n_threads=2)  # fmt: skip
        drift, top1, same_tokens, total = [], 0, 0, 0
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)  # fmt: skip
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            engine.reset()
            engine.eval(ids)
            theirs = torch.tensor(engine.scores[engine.n_tokens - 1])  # next-token logits after the prompt
            with torch.no_grad():
                if with_adapter:
                    mine = ours(input_ids=torch.tensor([ids])).logits[0, -1]
                else:
                    with lorakit.disable_adapters(ours):
                        mine = ours(input_ids=torch.tensor([ids])).logits[0, -1]
            drift.append(((mine - theirs).abs().max() / mine.abs().max()).item())
            top1 += int(mine.argmax() == theirs.argmax())
            # greedy continuations, token by token
            engine.reset()
            theirs_ids = [t for _, t in zip(range(tokens), engine.generate(ids, temp=0.0, top_k=1))]
            with torch.no_grad():
                if with_adapter:
                    out = ours.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
                else:
                    with lorakit.disable_adapters(ours):
                        out = ours.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
            mine_ids = out[0, len(ids) :].tolist()
            continuations.setdefault(with_adapter, []).append(mine_ids)
            same_tokens += sum(a == b for a, b in zip(mine_ids, theirs_ids))
            total += max(len(mine_ids), len(theirs_ids))
        results["adapter" if with_adapter else "base"] = {
            "logits_drift_median": statistics.median(drift), "logits_drift_max": max(drift),
            "top1_agree": top1 / len(prompts), "greedy_tokens_agree": same_tokens / total}  # fmt: skip
    # the yardstick for "follows the adapter": how much the adapter changes lorakit's own text
    pairs = list(zip(continuations[False], continuations[True]))
    same = sum(sum(a == b for a, b in zip(x, y)) for x, y in pairs)
    results["adapter_vs_base_lorakit_tokens_agree"] = same / sum(max(len(x), len(y)) for x, y in pairs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=20)
    args = parser.parse_args()
    from e2e import DATA, examples

    if not DATA.is_dir():
        print(f"skip: {DATA} not found")
        return
    torch.set_num_threads(2)
    adapter = args.adapter or train_adapter(Path(tempfile.mkdtemp()))
    prompts = [r["prompt"] for r in examples("test", args.prompts)]
    results = compare(adapter, prompts, args.tokens)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llama_cpp.json").write_text(json.dumps(results, indent=1))
    lines = [f"# llama.cpp (llama-cpp-python) against lorakit: SmolLM2-135M Q4_1, {args.prompts} E2E prompts, "
             f"{args.tokens} greedy tokens", "",
             "| | next-token logits: max diff / max logit (median, worst) | top-1 agree | greedy tokens agree |",
             "|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        lines.append(f"| {name} | {r['logits_drift_median']:.4f}, {r['logits_drift_max']:.4f} | "
                     f"{r['top1_agree']:.0%} | {r['greedy_tokens_agree']:.0%} |")  # fmt: skip
    lines += [
        "",
        f"lorakit with the adapter against lorakit without it: "
        f"{results['adapter_vs_base_lorakit_tokens_agree']:.0%} of greedy tokens agree (what the adapter changes).",
    ]
    (RESULTS / "llama_cpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
