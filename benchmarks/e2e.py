"""End to end: fine-tuning SmolLM2-135M with LoRA on E2E, `lorakit train` vs what a user would
otherwise write (a Hugging Face Trainer + PEFT script), same data and hyperparameters.

    python benchmarks/e2e.py                      # 960 examples each; ~15-20 min on 2 cores
    python benchmarks/e2e.py --examples 64        # a quick check

Each run is a fresh subprocess (so its peak RSS is its own). Reported: training tokens/s
(non-padding tokens of the training examples / training wall time), wall time, peak RSS, and the
final eval loss, which both sides compute with the same code on the same 200 test examples.
Results: benchmarks/results/e2e.json and .md. Needs ../shared/data/e2e (skips without it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "e2e"
RESULTS = ROOT / "benchmarks" / "results"
HPARAMS = dict(lr=1e-3, batch_size=8, max_length=128, rank=8, alpha=16, warmup_ratio=0.06, seed=0)


def examples(split: str, limit: int) -> list[dict]:
    from lorakit.train.data import read_records
    from lorakit.train.tasks import resolve_fields, to_examples

    records = read_records(DATA / f"{split}.txt")
    rows = to_examples(records, resolve_fields(records, "causal-lm"))
    return rows[:limit]


def eval_loss(model, tokenizer, rows: list[dict]) -> float:
    from lorakit.train.tasks import make_task

    model.eval()
    return make_task("causal-lm", tokenizer, HPARAMS["max_length"]).eval_loss(model, rows, batch_size=16)


def peak_mb() -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import rss_mb  # VmHWM: ru_maxrss would report the parent's peak

    return rss_mb()


def ablate(what: str) -> None:
    """Flip one lorakit fast path from its default in this (child) process, to measure it."""
    from lorakit.train.tasks import causal_lm

    if what == "logits-at-targets":  # LM head and softmax at every position
        causal_lm._takes_logits_mask = lambda model: False
    else:
        raise ValueError(what)


def run_lorakit(
    n: int,
    out: Path,
    bf16: bool,
    gradient_checkpointing: bool = False,
    packing: bool = True,
    group_by_length: bool | None = None,
    attention: str | None = None,
    ablations: tuple[str, ...] = (),
    quantize: str | None = None,
    targets: str = "q_proj,v_proj",
    lr: float | None = None,
) -> dict:
    from lorakit.train import TrainConfig, train
    from lorakit.train.api import load_trained

    torch.set_num_threads(2)
    for what in ablations:
        ablate(what)
    train_file = out / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in examples("train", n)))
    config = TrainConfig(
        model="smollm2-135m",
        task="causal-lm",
        data=str(train_file),
        output=str(out / "run"),
        targets=targets,
        epochs=1,
        eval_before=False,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        packing=packing,
        group_by_length=group_by_length,
        attention=attention,
        quantize=quantize,
        **{**HPARAMS, "lr": lr or HPARAMS["lr"]},
    )
    t0 = time.perf_counter()
    result = train(config, callbacks=[])
    wall = time.perf_counter() - t0
    peak = peak_mb()
    # eval on a fresh base: fp32, as the baseline's; a quantised run's on the base it trained on
    trained = load_trained(None, out / "run")
    return {
        "train_tokens_per_s": result.summary["tokens_per_s"],
        "wall_s": wall,
        "peak_rss_mb": peak,
        "eval_loss": eval_loss(trained.model, trained.tokenizer, examples("test", 200)),
    }


def run_hf_peft(n: int, out: Path, bf16: bool, nf4: bool = False) -> dict:
    """The baseline a user would write: tokenize with the chat template, mask the prompt, pad
    dynamically, and hand everything to transformers' Trainer with a PEFT model (on a base
    loaded through BitsAndBytesConfig, NF4 with double quantisation, for `nf4`)."""
    import peft
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from lorakit.models import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(2)
    tokenizer = load_tokenizer("smollm2-135m")
    if nf4:
        dtype = torch.bfloat16 if bf16 else torch.float32
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(
            resolve_model("smollm2-135m").path, quantization_config=q, dtype=dtype
        )
    else:
        base = load_model("smollm2-135m", "AutoModelForCausalLM").model
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=HPARAMS["rank"], lora_alpha=HPARAMS["alpha"], target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
    )

    def encode(row: dict) -> dict:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + r)[: HPARAMS["max_length"]]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(p) + r)[: len(ids)]}

    train_rows = [encode(r) for r in examples("train", n)]
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=HPARAMS["batch_size"],
        learning_rate=HPARAMS["lr"],
        num_train_epochs=1,
        warmup_steps=int(HPARAMS["warmup_ratio"] * -(-len(train_rows) // HPARAMS["batch_size"])),
        lr_scheduler_type="linear",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=HPARAMS["seed"],
        bf16=bf16,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    t0 = time.perf_counter()
    metrics = trainer.train().metrics
    wall = time.perf_counter() - t0
    tokens = sum(len(r["input_ids"]) for r in train_rows)
    return {
        "train_tokens_per_s": tokens / metrics["train_runtime"],
        "wall_s": wall,
        "peak_rss_mb": peak_mb(),
        "eval_loss": eval_loss(model, tokenizer, examples("test", 200)),
    }


RUNS = {
    "hf-trainer+peft": (run_hf_peft, dict(bf16=False)),
    "hf-trainer+peft-bf16": (run_hf_peft, dict(bf16=True)),
    "lorakit": (run_lorakit, dict(bf16=False)),
    "lorakit-bf16": (run_lorakit, dict(bf16=True)),
    # lorakit-bf16 (packed batches, eager attention, no length grouping) with one option flipped at a time
    "lorakit-bf16 -packing": (run_lorakit, dict(bf16=True, packing=False, group_by_length=False)),
    "lorakit-bf16 -packing +length-grouping": (run_lorakit, dict(bf16=True, packing=False, group_by_length=True)),
    "lorakit-bf16 +sdpa": (run_lorakit, dict(bf16=True, attention="sdpa")),
    "lorakit-bf16 -logits-at-targets": (run_lorakit, dict(bf16=True, ablations=("logits-at-targets",))),
    "lorakit-bf16 +grad-ckpt": (run_lorakit, dict(bf16=True, gradient_checkpointing=True)),
    "lorakit -packing": (run_lorakit, dict(bf16=False, packing=False, group_by_length=False)),
    # QLoRA: the frozen base's linear layers NF4 (e2e_quant)
    "lorakit-bf16 +nf4": (run_lorakit, dict(bf16=True, quantize="nf4")),
    "lorakit-bf16 +gguf": (run_lorakit, dict(bf16=True, quantize="gguf")),
    "hf-trainer+peft-bf16 +bnb-nf4": (run_hf_peft, dict(bf16=True, nf4=True)),
    # QLoRA's own recipe puts LoRA on every linear layer of the blocks, which it found is what
    # recovers full-precision quality on a 4-bit base
    "lorakit-bf16 all-linear": (run_lorakit, dict(bf16=True, targets="all-linear")),
    "lorakit-bf16 +nf4 all-linear": (run_lorakit, dict(bf16=True, quantize="nf4", targets="all-linear")),
    # ... and at lorakit's causal-LM default lr (train/defaults.py)
    "lorakit-bf16 all-linear lr 2e-3": (run_lorakit, dict(bf16=True, targets="all-linear", lr=2e-3)),
    "lorakit-bf16 +nf4 all-linear lr 2e-3": (
        run_lorakit,
        dict(bf16=True, quantize="nf4", targets="all-linear", lr=2e-3),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=960)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--name", default="e2e", help="results file stem under benchmarks/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skip: {DATA} not found (the E2E data set is not shipped with lorakit)")
        return
    if args.child:
        fn, options = RUNS[args.child]
        print(json.dumps(fn(args.examples, Path(tempfile.mkdtemp()), **options)))
        return
    results = {"examples": args.examples, "hparams": HPARAMS, "torch": torch.__version__, "runs": {}}
    previous = RESULTS / f"{args.name}.json"
    if previous.is_file() and json.loads(previous.read_text()).get("examples") == args.examples:
        results["runs"] = json.loads(previous.read_text())["runs"]  # keep the runs not redone
    for name in args.runs.split(","):
        print(f"[e2e] {name}", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--child", name, "--examples", str(args.examples)],
            capture_output=True,
            text=True,
        )
        results["runs"][name] = (
            json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-800:]}
        )
        print(results["runs"][name], flush=True)
        write_results(results, args.name)  # after each run: a stopped benchmark keeps what it measured


def write_results(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    base = results["runs"].get("hf-trainer+peft", {})
    lines = [
        f"# End to end: SmolLM2-135M + LoRA q,v r=8 on {results['examples']} E2E examples (1 epoch, batch 8, lr 1e-3)",
        "",
        "| run | train tokens/s | x HF+PEFT | wall s | peak RSS MB | eval loss (200 test) |",
        "|---|---|---|---|---|---|",
    ]
    for run, r in results["runs"].items():
        if "error" in r:
            lines.append(f"| {run} | error | | | | |")
            continue
        speed = r["train_tokens_per_s"] / base["train_tokens_per_s"] if "train_tokens_per_s" in base else float("nan")
        lines.append(
            f"| {run} | {r['train_tokens_per_s']:.0f} | {speed:.2f} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {r['eval_loss']:.4f} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
