"""The `lorakit` command line: a thin front door over the library.

    lorakit train    --model M --task T --data TRAIN [--eval-data EVAL] --output DIR [...]
    lorakit eval     --model M --adapter DIR --data FILE [--json]
    lorakit predict  --model M --adapter DIR --data FILE --output preds.jsonl
    lorakit generate --model M --adapter DIR [--adapter DIR2 ...] --prompt "..." [--prompt ...]
    lorakit merge    --model M --adapter DIR --output MERGED_DIR
    lorakit inspect  DIR
    lorakit combine  --adapter A --adapter B --weight 0.5 --weight 0.5 --output DIR [--combination svd --rank 8]
    lorakit demo     (the built-in default job)

A user's mistake is one red line and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LoRA fine-tuning: train, evaluate, merge, combine and inspect adapters "
    "(PEFT-compatible). Run `lorakit COMMAND --help` for each command's options.",
)
console = Console(stderr=True)
out = Console()

MODEL_HELP = "Base model: a Hugging Face hub id, a local directory, or an offline alias (minilm, smollm2-135m)."
QUANTIZE_HELP = (
    "Hold the base's linear layers quantised: nf4 | int8 | gguf | none. [default: as the adapter was trained "
    "(--quantize of lorakit train)]"
)
BF16_HELP = "Hold the base in bf16. [default: as a quantised training run held it, else fp32]"


# -- train ---------------------------------------------------------------------------------
@app.command()
def train(
    model: str | None = typer.Option(None, help=MODEL_HELP + " [default: minilm]"),
    task: str | None = typer.Option(None, help="classification | ner | causal-lm | seq2seq [default: classification]"),
    data: str | None = typer.Option(
        None,
        help=(
            "Training data: .jsonl/.json, .csv/.tsv, CoNLL .txt/.conll, E2E 'MR||text' .txt, or a datasets "
            "dir/hub name."
        ),
    ),
    eval_data: str | None = typer.Option(
        None, help="Held-out data, same format; picks the best adapter and scores it."
    ),
    output: str | None = typer.Option(
        None,
        help="Output dir: becomes a loadable adapter dir, with checkpoints/ and logs/ inside. [default: runs/lorakit]",
    ),
    config: Path | None = typer.Option(
        None, help="YAML/TOML/JSON file of options (flag names, '-' or '_'); flags given here win."
    ),
    method: str | None = typer.Option(
        None,
        help=(
            "Fine-tuning method: lora (LoRA, PEFT format) | full (every parameter) | top2 (last two blocks) | "
            "bitfit (biases) | adapter-h (Houlsby adapters) | adapter-l (Lin adapter) | adapter-p (Pfeiffer adapter) | "
            "adapter-drop (AdapterDrop) | prefix-embed (prefix "
            "token embeddings) | prefix-layer (prefix keys/values in every layer). Every method also trains a new"
            " task head. [default: lora]"
        ),
    ),
    adapter_size: int | None = typer.Option(
        None, help="adapter-h / adapter-l / adapter-p / adapter-drop: bottleneck size. [default: 16]"
    ),
    adapter_drop_layers: int | None = typer.Option(
        None, help="adapter-drop: the lowest blocks left without adapters. [default: 1]"
    ),
    prefix_length: int | None = typer.Option(
        None, help="prefix-embed / prefix-layer: number of prefix positions. [default: 16]"
    ),
    targets: str | None = typer.Option(
        None,
        help=(
            "Modules to adapt: comma list (q,v / query,value), a regex, or all-linear. [default: per task, "
            "printed at the start (docs/results.md, 'Defaults')]"
        ),
    ),
    rank: int | None = typer.Option(None, "--rank", "-r", help="LoRA rank r. [default: per task; 8]"),
    alpha: float | None = typer.Option(
        None, help="LoRA alpha; the update is scaled by alpha/r. [default: per task; 16]"
    ),
    dropout: float | None = typer.Option(None, help="Dropout on the adapter input. [default: 0]"),
    rslora: bool | None = typer.Option(None, "--rslora", help="Scale by alpha/sqrt(r) (rank-stabilised LoRA)."),
    dora: bool | None = typer.Option(
        None, "--dora", help="DoRA: also train a magnitude per output row of each adapted linear layer (use_dora)."
    ),
    init: str | None = typer.Option(
        None,
        help=(
            "How A and B start: kaiming (B zero) | gaussian (the paper's) | pissa (W's principal singular "
            "directions; W keeps the residual) | pissa_niter_N (randomised SVD) | olora (QR of W). The saved "
            "adapter is always a plain LoRA adapter for the untouched base. [default: kaiming]"
        ),
    ),
    add_tokens: str | None = typer.Option(
        None,
        help=(
            'New special tokens, comma-separated (e.g. "<tool>,<sep>"): added to the tokenizer (saved beside the '
            "adapter), and only their embedding rows train and are saved (PEFT's trainable_token_indices)."
        ),
    ),
    lr: float | None = typer.Option(
        None, help="Peak learning rate. [default: per method, and for LoRA per task; printed at the start]"
    ),
    lora_plus_ratio: float | None = typer.Option(
        None, help="LoRA+: B's learning rate = lr x this (16 in the LoRA+ paper). [default: 1]"
    ),
    epochs: int | None = typer.Option(None, help="Passes over the training data. [default: 1]"),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimizer steps (overrides --epochs)."),
    batch_size: int | None = typer.Option(None, help="Examples per micro-batch. [default: 16]"),
    grad_accum: int | None = typer.Option(None, help="Micro-batches per optimizer step. [default: 1]"),
    max_length: int | None = typer.Option(
        None, help="Truncate sequences to this many tokens (counted in the log). [default: 128]"
    ),
    warmup_ratio: float | None = typer.Option(None, help="Fraction of steps for linear warmup. [default: 0.06]"),
    scheduler: str | None = typer.Option(None, help="linear | cosine | constant. [default: linear]"),
    bf16: bool | None = typer.Option(
        None,
        "--bf16",
        help=(
            "Frozen base held in bf16, bf16 autocast (fast on CPUs with AMX/AVX512-BF16 and GPUs); the adapter "
            "stays fp32."
        ),
    ),
    quantize: str | None = typer.Option(
        None,
        help=(
            "Hold the frozen base's linear layers quantised: nf4 (QLoRA: 4-bit NormalFloat, double-quantised"
            " scales) or int8, through bitsandbytes; gguf: a GGUF model's own blocks (Q4_0, Q4_1, Q8_0, K-quants)."
            " The adapter stays fp32. [default: off]"
        ),
    ),
    attention: str | None = typer.Option(
        None,
        help=(
            "Attention kernel (sdpa, eager, ...). [default: eager for causal LMs with --bf16 on CPU (faster "
            "there), else the model's own]"
        ),
    ),
    packing: bool | None = typer.Option(
        None,
        "--packing/--no-packing",
        help=(
            "causal-lm: padding-free batches, each micro-batch's examples in one row with attention kept within "
            "each example (same gradients as padded batches, no compute on padding). Models that fail a packed-"
            "vs-unpacked probe train padded. [default: on]"
        ),
    ),
    group_by_length: bool | None = typer.Option(
        None,
        "--group-by-length/--no-group-by-length",
        help=(
            "Batches of similar lengths (less padding, faster; in short runs the eval loss can suffer). [default:"
            " on unless batches are packed]"
        ),
    ),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing", help="Recompute activations in backward to save memory."
    ),
    eval_every: int | None = typer.Option(
        None, help="Evaluate (and checkpoint) every N steps. [default: only at the end]"
    ),
    save_every: int | None = typer.Option(None, help="Checkpoint every N steps."),
    eval_generate: int | None = typer.Option(
        None, help="Generation tasks: BLEU/ROUGE-L on this many eval inputs at the end."
    ),
    eval_loss_examples: int | None = typer.Option(
        None, help="Generation tasks: eval loss on at most this many examples."
    ),
    max_new_tokens: int | None = typer.Option(
        None, help="Generation tasks: length limit of generated eval outputs. [default: 64]"
    ),
    eval_batch_size: int | None = typer.Option(None, help="Examples per evaluation batch. [default: 32]"),
    resume: bool | None = typer.Option(None, "--resume", help="Continue from the newest checkpoint in --output."),
    seed: int | None = typer.Option(None, help="Random seed (data order, init, dropout). [default: 0]"),
    device: str | None = typer.Option(
        None,
        help="cpu, cuda or cuda:N. [default: this process's GPU (LOCAL_RANK under torchrun) if there is one, else cpu]",
    ),
    max_train_examples: int | None = typer.Option(None, help="Train on a seeded random subset of this size."),
    max_eval_examples: int | None = typer.Option(None, help="Evaluate on a seeded random subset of this size."),
    text_field: str | None = typer.Option(None, help="Column holding the text / tokens / prompt / source."),
    label_field: str | None = typer.Option(None, help="Column holding the label / tags / response / target."),
    pair_field: str | None = typer.Option(None, help="Column holding the second text of a pair."),
    prompt_template: str | None = typer.Option(
        None,
        help=(
            'causal-lm: wrap each prompt in this text at {prompt}, e.g. "Describe the restaurant.\\n{prompt}" '
            "(\\n: a line break), then the chat template. Saved with the adapter: eval, predict and generate "
            "apply it too."
        ),
    ),
    distributed: str | None = typer.Option(
        None, help="Under torchrun: ddp (replicated base, adapters all-reduced) or fsdp (sharded base). [default: ddp]"
    ),
    nproc: int | None = typer.Option(
        None,
        help=(
            "Launch this many processes on this machine through torchrun (shortcut for `torchrun --nproc_per_node"
            " N -m lorakit train ...`)."
        ),
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fine-tune a model with LoRA on a data set; --output becomes the adapter dir.

    Example: lorakit train --model minilm --task classification --data train.tsv --eval-data dev.tsv --output runs/sst2
    """
    flags = {
        k: v for k, v in locals().items() if k not in ("config", "quiet", "rslora", "dora", "nproc") and v is not None
    }
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_torchrun(nproc))
    from .train import TrainConfig
    from .train.api import LOGS
    from .train.api import train as run
    from .train.callbacks import default_callbacks
    from .train.defaults import describe as describe_defaults

    if rslora is not None:
        flags["use_rslora"] = rslora
    if dora is not None:
        flags["use_dora"] = dora
    if prompt_template is not None:  # a shell's "\n" is two characters; the template means a line break
        flags["prompt_template"] = prompt_template.replace("\\n", "\n")
    options = {**_read_config(config), **flags}
    cfg = TrainConfig(**options)
    if cfg.defaults_chosen:
        console.print(describe_defaults(cfg.defaults_chosen, cfg.task, cfg.method))
    result = run(cfg, callbacks=default_callbacks(Path(cfg.output) / LOGS, progress=not quiet))
    _print_summary(result.summary, cfg)
    if result.summary["interrupted"]:
        console.print(
            f"[yellow]interrupted at step {result.summary['steps']}; a checkpoint was saved. "
            f"Continue with: lorakit train ... --output {cfg.output} --resume[/]"
        )
        raise typer.Exit(130)


def _torchrun(nproc: int) -> int:
    """Re-run this command under torchrun with `nproc` processes (gloo on CPU, NCCL on GPU)."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--nproc"):
            skip = arg == "--nproc"  # "--nproc N": drop the value too
            continue
        args.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lorakit",
        *args,
    ]
    console.print(f"launching: {' '.join(command[2:])}")
    return subprocess.call(command)


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    from .train.config import read_config_file

    return read_config_file(path)


def _print_summary(summary: dict[str, Any], cfg) -> None:
    before, after = summary.get("baseline_eval") or {}, summary.get("final_eval") or {}
    if after:
        table = Table(title="held-out scores", show_edge=False)
        for col in ("metric", "before", "after"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        for key, value in after.items():
            table.add_row(key, _fmt(before.get(key)), _fmt(value))
        out.print(table)
    out.print(
        f"steps: {summary['steps']}  time: {summary['train_runtime_s']:.0f}s  "
        f"tokens/s: {summary['tokens_per_s']:.0f}  truncated: {summary['truncated']}"
    )
    if "allreduce_bytes_per_step" in summary:
        out.print(
            f"all-reduced per step: {summary['allreduce_bytes_per_step']:,} bytes "
            f"(full fine-tuning would send {summary['full_ft_allreduce_bytes_per_step']:,})"
        )
    out.print(f"adapter: {summary['adapter_dir']}")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


# -- eval / predict / generate -------------------------------------------------------------
@app.command("eval")
def eval_(
    adapter: list[Path] = typer.Option(
        ..., help="Adapter dir (from lorakit train, or PEFT's save_pretrained); repeat to score several in one pass."
    ),
    data: str | None = typer.Option(None, help="Data to score, in any format train reads."),
    model: str | None = typer.Option(None, help=MODEL_HELP + " [default: the one the adapter records]"),
    base: bool = typer.Option(False, "--base", help="Also score the base model without any adapter."),
    harness: str | None = typer.Option(
        None,
        help=(
            "lm-evaluation-harness tasks (comma list) instead of --data, every adapter in one pass "
            "(pip install 'lm-eval[api]'; lorakit's demo tasks: python -m lorakit.data.lm_eval_tasks DIR)."
        ),
    ),
    include_path: str | None = typer.Option(None, help="--harness: a directory of task YAMLs."),
    limit: int | None = typer.Option(None, help="--harness: at most this many documents per task."),
    compare: bool = typer.Option(
        False, "--compare", help="Several adapters: also score them one run each, and print both times."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object on stdout."),
    generate: int = typer.Option(0, help="Generation tasks: also BLEU/ROUGE-L on this many inputs."),
    batch_size: int = typer.Option(32, help="Examples per batch."),
    max_new_tokens: int = typer.Option(64, help="Generation length limit."),
    task: str | None = typer.Option(None, help="Override the task recorded with the adapter."),
    quantize: str | None = typer.Option(None, help=QUANTIZE_HELP),
    bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help=BF16_HELP),
) -> None:
    """Score adapters on a data file (accuracy/F1, entity F1, loss/perplexity, BLEU/ROUGE-L).

    Several --adapter (and --base) are scored in one pass: each batch runs once, its rows repeated
    per adapter in a mixed batch."""
    from . import lora
    from .train.api import evaluate, evaluate_adapters, load_trained, only

    if (data is None) == (harness is None):
        console.print("[red]error:[/red] give --data FILE or --harness TASKS (one of them)")
        raise typer.Exit(2)
    trained = load_trained(model, adapter if len(adapter) > 1 else adapter[0], task=task, quantize=quantize, bf16=bf16)
    if harness:
        _harness(trained, adapter, base, harness, include_path, limit, batch_size, as_json)
        return
    options = dict(generate=generate, batch_size=batch_size, max_new_tokens=max_new_tokens)
    if len(adapter) == 1 and not base:
        scores = evaluate(trained, data, **options)
        if as_json:
            print(json.dumps(scores))
            return
        for key, value in scores.items():
            out.print(f"{key}: {_fmt(value)}")
        return
    names = lora.adapter_names(trained.model) + ([None] if base else [])
    labels = [str(d) for d in adapter] + (["(base)"] if base else [])
    start = time.perf_counter()
    rows = evaluate_adapters(trained, names, data, **options)
    seconds = {"one pass": time.perf_counter() - start}
    if compare:
        start = time.perf_counter()
        for name in names:
            with only(trained.model, name):
                evaluate(trained, data, **options)
        seconds["one run per adapter"] = time.perf_counter() - start
    if as_json:
        print(json.dumps({"scores": dict(zip(labels, rows)), "seconds": seconds}))
        return
    table = Table(show_edge=False)
    table.add_column("adapter")
    for key in rows[0]:
        table.add_column(key, justify="right")
    for label, row in zip(labels, rows):
        table.add_row(label, *(_fmt(v) for v in row.values()))
    out.print(table)
    out.print(", ".join(f"{k}: {v:.2f} s" for k, v in seconds.items()))


def _harness(trained, adapter: list[Path], base: bool, tasks: str, include_path: str | None, limit: int | None,
             batch_size: int, as_json: bool) -> None:  # fmt: skip
    """`lorakit eval --harness`: lm-eval's metrics for every adapter (and the base), one table."""
    from . import lora
    from .train.harness import run_harness

    names = lora.adapter_names(trained.model) + ([None] if base else [])
    labels = [str(d) for d in adapter] + (["(base)"] if base else [])
    results = run_harness(trained.model, trained.tokenizer, names, [t.strip() for t in tasks.split(",")],
                          include_path, limit, batch_size)  # fmt: skip
    table = {label: {f"{task} {metric.split(',')[0]}": value for task, metrics in r["results"].items()
                     for metric, value in metrics.items() if isinstance(value, float) and "stderr" not in metric}
             for label, r in zip(labels, results)}  # fmt: skip
    if as_json:
        print(json.dumps(table))
        return
    out_table = Table(show_edge=False)
    out_table.add_column("adapter")
    columns = list(next(iter(table.values())))
    for column in columns:
        out_table.add_column(column, justify="right")
    for label, row in table.items():
        out_table.add_row(label, *(_fmt(row.get(c)) for c in columns))
    out.print(out_table)


@app.command()
def predict(
    adapter: Path = typer.Option(..., help="Adapter dir."),
    data: str = typer.Option(..., help="Inputs, in any format train reads (labels not needed)."),
    output: Path = typer.Option(..., help="Where to write predictions (JSONL: the input fields plus 'prediction')."),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    batch_size: int = typer.Option(16, help="Examples per batch."),
    max_new_tokens: int = typer.Option(64, help="Generation length limit."),
    quantize: str | None = typer.Option(None, help=QUANTIZE_HELP),
    bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help=BF16_HELP),
) -> None:
    """Predict labels, tags or text for every input of a file."""
    from ._fs import atomic_write_text
    from .train.api import _config_for, load_trained, read_examples

    trained = load_trained(model, adapter, quantize=quantize, bf16=bf16)
    examples = read_examples(data, _config_for(trained, data, None), None, "input data")
    kwargs = {"max_new_tokens": max_new_tokens} if trained.task.name in ("causal-lm", "seq2seq") else {}
    preds = trained.task.predict(trained.model, examples, batch_size=batch_size, **kwargs)
    lines = [json.dumps({**e, "prediction": p}) for e, p in zip(examples, preds)]
    atomic_write_text(output, "\n".join(lines) + "\n")
    console.print(f"wrote {len(lines)} predictions to {output}")


@app.command()
def generate(
    prompt: list[str] = typer.Option(..., help="A prompt; repeat for several (one batch)."),
    adapter: list[Path] = typer.Option([], help="Adapter dir; repeat to give one adapter per prompt (mixed batch)."),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    max_new_tokens: int = typer.Option(64, help="Generation length limit."),
    quantize: str | None = typer.Option(None, help=QUANTIZE_HELP),
    bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help=BF16_HELP),
) -> None:
    """Generate text; with several --adapter, prompt i uses adapter i, all in one batch."""
    from .train.api import load_trained

    if not adapter:
        raise ValueError("give at least one --adapter (the base alone: use transformers directly)")
    if len(adapter) > 1 and len(adapter) != len(prompt):
        raise ValueError(
            f"{len(adapter)} adapters for {len(prompt)} prompts: give one --adapter per --prompt, or one for all"
        )
    trained = load_trained(model, adapter, quantize=quantize, bf16=bf16)
    names = None
    if len(adapter) > 1:
        from .lora import adapter_names

        names = adapter_names(trained.model)
    texts = trained.task.generate(
        trained.model, prompt, batch_size=len(prompt), max_new_tokens=max_new_tokens, adapter_names=names
    )
    for p, t in zip(prompt, texts):
        out.print(f"[bold]{p}[/]\n{t}\n")


# -- merge / inspect / combine -------------------------------------------------------------
@app.command()
def merge(
    adapter: Path = typer.Option(..., help="Adapter dir."),
    output: Path = typer.Option(..., help="Where to write the merged model (a plain transformers model dir)."),
    model: str | None = typer.Option(None, help=MODEL_HELP),
) -> None:
    """Merge an adapter into its base: a plain transformers model dir, no lorakit needed to load it.

    An adapter trained on a quantised base (--quantize) merges into the dequantised weights it
    was trained against, written in bf16 or fp32 as the run computed; the drift of that model,
    and of it quantised again, from the unmerged adapter is printed."""
    import shutil

    from ._fs import crash_point, replace_dir
    from .train.api import load_trained, merge_trained

    trained = load_trained(model, adapter)  # refuses NaN/inf adapter weights
    plain, drift = merge_trained(trained)  # safe merge: refuses a NaN/inf result, nothing written
    # Written aside, then swapped in whole: an interrupted merge leaves the old --output intact.
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier merge's leftovers
    plain.save_pretrained(tmp)
    trained.tokenizer.save_pretrained(tmp)
    crash_point("merge.written")
    replace_dir(tmp, output)
    console.print(f"merged model written to {output}")
    if drift:
        scheme = trained.info["quantize"]
        again = drift.get("requantised_drift")
        requantised = (
            f", {again:.2e} if quantised to {scheme} again (PEFT's merge-then-quantise warning)" if again else ""
        )
        console.print(
            f"trained on a {scheme} base: merged into its dequantised weights; max |logits difference| against "
            f"the unmerged adapter, relative to max |logits|: {drift['merged_drift']:.2e} as written{requantised}"
        )


@app.command()
def export(
    adapter: Path = typer.Argument(..., help="Adapter dir (from lorakit train, or PEFT's save_pretrained)."),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp's LoRA file) | ollama (+ a Modelfile)."),
    output: Path = typer.Option(..., help="gguf: the .gguf file to write; ollama: the directory to write."),
    outtype: str = typer.Option("f32", help="Tensor type in the file: f32 | f16 | bf16 | q8_0."),
    model: str | None = typer.Option(None, help=MODEL_HELP + " [default: the one the adapter records]"),
    base_gguf: Path | None = typer.Option(
        None, help="ollama: the base model's GGUF file. [default: the base's own, when it is one (smollm2-135m)]"
    ),
) -> None:
    """Export an adapter for llama.cpp (GGUF LoRA) or Ollama (GGUF LoRA + Modelfile), unmerged."""
    from .export import export_adapter

    written = export_adapter(adapter, fmt, output, outtype=outtype, model=model, base_gguf=base_gguf)
    for path in written:
        console.print(f"wrote {path}")
    if fmt == "ollama":
        console.print(f"then: ollama create {adapter.resolve().name} -f {written[-1]}")


@app.command()
def inspect(adapter: Path = typer.Argument(..., help="Adapter dir.")) -> None:
    """Describe an adapter dir: base, targets, rank, parameters, size on disk, PEFT compatibility."""
    from .inspect_adapter import describe

    info = describe(adapter)
    table = Table(show_header=False, show_edge=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command()
def combine(
    adapter: list[Path] = typer.Option(..., help="Adapter dir; repeat for each input."),
    weight: list[float] = typer.Option(..., help="Weight of each adapter, in order."),
    output: Path = typer.Option(..., help="Where to write the combined adapter."),
    combination: str = typer.Option("cat", help="cat (exact, ranks add up) or svd (truncated to --rank)."),
    rank: int | None = typer.Option(None, help="svd: the rank to keep [default: the largest input rank]."),
) -> None:
    """Weighted combination of adapters (sum of w_i * delta W_i) into a new adapter."""
    from .lora import combine_adapters

    combine_adapters(adapter, weight, output, combination, rank)
    console.print(f"combined adapter written to {output}")


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), help="Where the demo adapter goes."),
    steps: int = typer.Option(375, help="Optimizer steps (375 = 3 epochs of the 2,000 training rows)."),
) -> None:
    """The built-in default job: LoRA-fine-tune MiniLM on the shipped demo task, offline."""
    from .demo import run_demo

    run_demo(output, steps)


@app.command()
def serve(
    model: str = typer.Option(..., help=MODEL_HELP),
    adapters: Path = typer.Option(..., help="Directory of adapter dirs: each subdirectory is served under its name."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (the default is loopback only)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    served_name: str | None = typer.Option(
        None, help="The base model's name in requests and /v1/models. [default: --model]"
    ),
    task: str | None = typer.Option(None, help="causal-lm | classification [default: what the adapters record]"),
    max_adapters: int = typer.Option(
        8, min=1, help="Adapters held in memory at once; least recently used are evicted (and reloaded on demand)."
    ),
    max_batch_size: int = typer.Option(32, min=1, help="Rows in one forward pass."),
    max_tokens: int = typer.Option(512, min=1, help="Cap on a request's max_tokens."),
    max_concurrent: int = typer.Option(64, min=1, help="Requests in progress at once; more get 429."),
    max_body_bytes: int = typer.Option(1 << 20, min=1, help="Largest request body; larger gets 413."),
    timeout: float = typer.Option(120.0, min=0.1, help="Seconds a request may take (queueing included); then 504."),
    watch_interval: float = typer.Option(
        2.0, min=0.0, help="Poll the adapters dir every N seconds for added, changed or removed adapters (0: off)."
    ),
    allow_any_path: bool = typer.Option(
        False, "--allow-any-path", help="Let POST /v1/adapters load from outside the adapters dir."
    ),
    no_mixed: bool = typer.Option(
        False, "--no-mixed", help="Baseline: batch only requests for the same adapter (no mixed batches)."
    ),
    no_admin: bool = typer.Option(False, "--no-admin", help="Leave out the adapter load/unload endpoints."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    quantize: str | None = typer.Option(
        None, help="Hold the base's linear layers quantised: nf4 | int8 | gguf (QLoRA-trained adapters). [default: off]"
    ),
    bf16: bool = typer.Option(False, "--bf16", help="Hold the base in bf16 (and compute in it)."),
) -> None:
    """Serve many adapters on one frozen base: OpenAI-compatible HTTP, mixed-adapter batches.

    Example: lorakit serve --model smollm2-135m --adapters runs/ --port 8000
    """
    from .serve import EngineConfig
    from .serve.app import Limits
    from .serve.app import serve as run_server

    config = EngineConfig(
        max_adapters=max_adapters,
        max_batch_size=max_batch_size,
        max_tokens=max_tokens,
        request_timeout_s=timeout,
        mixed=not no_mixed,
        watch_interval_s=watch_interval,
        allow_any_path=allow_any_path,
    )
    limits = Limits(max_body_bytes=max_body_bytes, max_concurrent=max_concurrent)
    run_server(
        model,
        str(adapters),
        host=host,
        port=port,
        served_name=served_name,
        task=task,
        config=config,
        limits=limits,
        admin=not no_admin,
        log_level=log_level,
        quantize=quantize,
        bf16=bf16,
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError) as e:
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        console.print(f"[red]error:[/] {message}")
        sys.exit(2)


if __name__ == "__main__":
    main()
