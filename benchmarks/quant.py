"""QLoRA on CPU: the frozen base held in bf16 against NF4, lorakit against PEFT + bitsandbytes.

Each row runs in a fresh child process (peak RSS is the process's own VmHWM); its training steps
(forward + backward + AdamW on the adapter, LoRA q,v r=8 alpha 16) are timed after 2 warm-ups,
median of --steps. Rows:
  lorakit-bf16   what `lorakit train --bf16` does: the base loaded in bf16 (lazily mapped), autocast
  lorakit-nf4    `--quantize nf4 --bf16`: the base loaded lazily in bf16, each linear weight read
                 from the file and quantised to NF4 (bitsandbytes blocks, lorakit's NF4Linear), bf16 compute
  lorakit-gguf   `--quantize gguf --bf16` (SmolLM2 only, the model that ships as a GGUF): the file's
                 own Q4_1 blocks, dequantised in every forward and backward
  peft-bf16      transformers' bf16 load (lazily mapped) + PEFT: the plain bf16 reference
  peft-bnb-nf4   transformers' BitsAndBytesConfig (NF4, double quant, bf16 compute) + PEFT
Models: SmolLM2-135M (real, 4 x 128 tokens) and a TinyLlama-1.1B-shaped LLaMA (random init,
2 x 128 tokens, written once as bf16 under $LORAKIT_CACHE/bench).

--layer instead times one 2048 -> 5632 projection (TinyLlama's gate/up), 256 rows, bf16: forward
and forward + input-gradient, for a bf16 nn.Linear, bitsandbytes' Linear4bit, lorakit's
NF4Linear, torchao's NF4Tensor (linear_nf4) and lorakit's GGUFLinear on Q4_1 blocks: the
measurement behind the choice of backend.

--gradient-checkpointing runs every row with it (`lorakit train --gradient-checkpointing`;
QLoRA's own recipe, and what PEFT's `prepare_model_for_kbit_training` turns on): activations
shrink to a layer's inputs, so the weights' share of the peak shows. Writes quant_gc.{md,json}.

--base-loss scores SmolLM2-135M itself, no adapter, on the 200 E2E test examples the e2e
benchmark uses, with its base held in fp32, NF4 and its GGUF blocks: how much each scheme
costs before any training.

    python benchmarks/quant.py [--models smollm2,tinyllama] [--steps 8] [--gradient-checkpointing]
    python benchmarks/quant.py --layer
    python benchmarks/quant.py --base-loss
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rss_mb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("lorakit-bf16", "lorakit-nf4", "lorakit-gguf", "peft-bf16", "peft-bnb-nf4")
GGUF_MODELS = {"smollm2": "smollm2-135m"}  # the models that ship as a GGUF file
SHAPES = {"smollm2": (4, 128), "tinyllama": (2, 128)}


def model_dir(name: str) -> Path:
    from lorakit.models import cache_dir, resolve_model

    if name == "smollm2":
        return Path(resolve_model("smollm2-135m").path)
    directory = cache_dir() / "bench" / "tinyllama-1.1b-shape"
    if not (directory / "config.json").is_file():
        import transformers as tf

        config = tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
        torch.manual_seed(0)
        tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def build(row: str, path: Path, name: str) -> torch.nn.Module:
    import transformers as tf

    import lorakit
    from lorakit.models import checkpoint_reader, gguf_source
    from lorakit.train.trainer import hold_frozen_in_bf16

    if row.startswith("peft"):
        import peft

        q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        quantized = {"quantization_config": q} if row == "peft-bnb-nf4" else {}
        base = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **quantized)
        return peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    if row == "lorakit-gguf":  # as `lorakit train --quantize gguf --bf16` loads it
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        lorakit.quantize_base(model, "gguf", compute_dtype=torch.bfloat16, gguf_file=gguf_source(GGUF_MODELS[name]))
    elif row == "lorakit-nf4":  # as `lorakit train --quantize nf4 --bf16` loads it
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        lorakit.quantize_base(model, "nf4", compute_dtype=torch.bfloat16, reader=checkpoint_reader(str(path)))
    else:  # as `lorakit train --bf16` loads a frozen base: in bf16 straight away
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    hold_frozen_in_bf16(model)
    return model


def child(model_name: str, row: str, steps: int, checkpointing: bool) -> dict:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = build(row, model_dir(model_name), model_name).train()
    if checkpointing:  # as lorakit's trainer turns it on
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    load_s = time.perf_counter() - t0
    frozen = [p for p in model.parameters() if not p.requires_grad]
    weight_mb = sum(p.numel() * p.element_size() for p in frozen) / 2**20
    weight_mb += sum(b.numel() * b.element_size() for b in model.buffers()) / 2**20
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch, seq = SHAPES[model_name]
    ids = torch.randint(100, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"step_ms": statistics.median(times[2:]) * 1000, "spread_ms": (max(times[2:]) - min(times[2:])) * 1000,
            "peak_rss_mb": rss_mb(), "weight_mb": weight_mb, "load_s": load_s, "loss": loss.item()}  # fmt: skip


def layer_times(repeats: int = 15) -> dict[str, dict[str, float]]:
    """Median ms of forward and of forward + input gradient for one NF4 projection, per backend."""
    import bitsandbytes as bnb
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

    from lorakit.quantize import GGUFLinear, nf4_linear_class

    torch.set_num_threads(2)
    torch.manual_seed(0)
    weight = torch.randn(5632, 2048, dtype=torch.bfloat16) * 0.02
    x = torch.randn(256, 2048, dtype=torch.bfloat16, requires_grad=True)
    dense = torch.nn.Linear(2048, 5632, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    dense.weight.copy_(weight)
    layers = {"bf16 nn.Linear": dense}
    for name, cls in (("bitsandbytes Linear4bit", bnb.nn.Linear4bit), ("lorakit NF4Linear", nf4_linear_class())):
        layer = cls(2048, 5632, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64, compress_statistics=True,
                                         quant_type="nf4", module=layer)  # fmt: skip
        layers[name] = layer.to("cpu").train()
    nf4 = to_nf4(weight, block_size=64, scaler_block_size=256)
    layers["torchao NF4Tensor"] = lambda inputs: linear_nf4(inputs, nf4)
    import gguf

    q4_1 = gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q4_1)
    layers["lorakit GGUFLinear (Q4_1)"] = GGUFLinear(torch.from_numpy(q4_1), "Q4_1", 2048, None, torch.bfloat16)

    def run(layer, backward: bool) -> float:
        t = time.perf_counter()
        out = layer(x)
        if backward:
            torch.autograd.grad(out.sum(), x)
        return (time.perf_counter() - t) * 1000

    # Round-robin over the layers, so a slow spell of this noisy machine hits them all alike.
    samples = {(name, backward): [] for name in layers for backward in (False, True)}
    for round_ in range(repeats + 2):
        for (name, backward), times in samples.items():
            ms = run(layers[name], backward)
            if round_ >= 2:  # two warm-ups
                times.append(ms)
    return {name: {"forward_ms": statistics.median(samples[name, False]),
                   "forward_backward_ms": statistics.median(samples[name, True])} for name in layers}  # fmt: skip


def write_layer(times: dict) -> None:
    ref = times["bf16 nn.Linear"]
    lines = [
        f"# One NF4 projection on CPU (torch {torch.__version__}, 2 threads): 256 x 2048 -> 5632, bf16, median ms",
        "",
        "| layer | forward | x bf16 | forward + input grad | x bf16 |",
        "|---|---|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(
            f"| {name} | {t['forward_ms']:.1f} | {t['forward_ms'] / ref['forward_ms']:.2f} "
            f"| {t['forward_backward_ms']:.1f} | {t['forward_backward_ms'] / ref['forward_backward_ms']:.2f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_layer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def base_losses() -> dict[str, float]:
    """SmolLM2's eval loss on E2E test examples per quantisation of its base (no adapter)."""
    from e2e import eval_loss, examples

    from lorakit.models import load_tokenizer
    from lorakit.train.api import load_base

    torch.set_num_threads(2)
    rows, tokenizer = examples("test", 200), load_tokenizer("smollm2-135m")
    losses = {}
    for scheme in (None, "nf4", "gguf"):
        model = load_base("smollm2-135m", "causal-lm", quantize=scheme, bf16=scheme is not None)
        with torch.no_grad():
            losses[scheme or "fp32"] = eval_loss(model, tokenizer, rows)
    (RESULTS / "quant_base_loss.json").write_text(json.dumps(losses, indent=1))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tinyllama")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="every row with it")
    parser.add_argument("--layer", action="store_true", help="time one NF4 projection per backend")
    parser.add_argument("--base-loss", action="store_true", help="SmolLM2's E2E loss per scheme, no adapter")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layer:
        write_layer(layer_times())
        return
    if args.base_loss:
        print(base_losses())
        return
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.gradient_checkpointing)))
        return
    results = {"torch": torch.__version__, "steps": args.steps, "rows": {},
               "gradient_checkpointing": args.gradient_checkpointing}  # fmt: skip
    for name in args.models.split(","):
        model_dir(name)  # build the shape once, outside the timed children
        for row in ROWS:
            if row == "lorakit-gguf" and name not in GGUF_MODELS:
                continue
            command = [sys.executable, __file__, "--child", name, row, "--steps", str(args.steps)]
            command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            run = subprocess.run(command, capture_output=True, text=True, env=env)
            if run.returncode:
                raise SystemExit(f"{name} {row} failed:\n{run.stderr[-3000:]}")
            results["rows"][f"{name}/{row}"] = json.loads(run.stdout.strip().splitlines()[-1])
            print(name, row, results["rows"][f"{name}/{row}"], flush=True)
    write(results)


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "quant_gc" if results["gradient_checkpointing"] else "quant"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    checkpointing = ", gradient checkpointing" if results["gradient_checkpointing"] else ""
    lines = [f"# QLoRA on CPU (torch {results['torch']}, 2 threads, LoRA q,v r=8, bf16 compute{checkpointing}, "
             f"median of {results['steps']} steps, each row a fresh process)", "",
             "| model | row | step ms | x lorakit-bf16 | peak RSS MB | x lorakit-bf16 | frozen weights MB "
             "| x lorakit-bf16 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in results["rows"].items():
        model, _ = key.split("/")
        ref = results["rows"][f"{model}/lorakit-bf16"]
        lines.append(f"| {key.replace('/', ' | ')} | {r['step_ms']:.0f} | {r['step_ms'] / ref['step_ms']:.2f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} "
                     f"| {r['weight_mb']:.0f} | {r['weight_mb'] / ref['weight_mb']:.2f} |")  # fmt: skip
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
