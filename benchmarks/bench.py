"""The side-by-side benchmark suite: lorakit vs PEFT vs full fine-tuning, on this machine.

    python benchmarks/bench.py                       # every section, every model (~15-25 min on 2 cores)
    python benchmarks/bench.py --quick               # fewer repeats, GPT-2-shaped only (a smoke run)
    python benchmarks/bench.py --sections train,mixed --models gpt2,minilm

Sections: train (step time split into forward/backward/optimizer, tokens/s), memory (peak RSS
per configuration in a fresh subprocess, and analytic parameter+gradient+AdamW bytes), infer
(base vs unmerged vs merged, batch forward and greedy generate), mixed (1/4/16/64 distinct
adapters in one batch), io (adapter load, switch, merge, unmerge). Results: benchmarks/results/
bench.json and bench.md. No timing is asserted anywhere: these are measurements to read.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit.train.trainer import adamw  # fused AdamW, the same for every row

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SPECS, Spec, batch_for, configure, gpt2_shaped, interleave, rss_mb, timed  # noqa: E402

import lorakit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_CONFIGS = ["full", "floor", "peft-qv", "lorakit-qv", "peft-all", "lorakit-all"]


# -- 1. training step ----------------------------------------------------------------------------
def train_step(model, batch, optimizer) -> dict[str, float]:
    t_fwd, out = timed(lambda: model(**batch).loss)
    t_bwd, _ = timed(out.backward)
    t_opt = 0.0
    if optimizer is not None:
        t_opt, _ = timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    else:
        model.zero_grad(set_to_none=True)
    return {"forward": t_fwd, "backward": t_bwd, "optimizer": t_opt, "total": t_fwd + t_bwd + t_opt}


def bench_train(spec: Spec, base, repeats: int) -> dict:
    batch = batch_for(spec)
    runs = {}
    for how in TRAIN_CONFIGS:
        model = configure(base, spec, how).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw([{"params": params}], lr=1e-4) if params else None
        runs[how] = lambda m=model, o=optimizer: train_step(m, batch, o)
    timer = interleave(runs, repeats)
    tokens = spec.batch * spec.seq
    out = {}
    for how in TRAIN_CONFIGS:
        out[how] = {
            phase: timer.median(f"{how}/{phase}") * 1000 for phase in ("forward", "backward", "optimizer", "total")
        }
        out[how]["spread"] = timer.spread(f"{how}/total")
        out[how]["tokens_per_s"] = tokens / timer.median(f"{how}/total")
    floor = out["floor"]["total"]
    for how in TRAIN_CONFIGS:
        out[how]["x_floor"] = out[how]["total"] / floor
    return out


# -- 2. memory (fresh subprocess per configuration) ---------------------------------------------
def memory_child(model_key: str, how: str, steps: int = 3) -> dict:
    spec = SPECS[model_key]
    base = spec.build()
    before = rss_mb()
    model = configure(base, spec, how).train()
    del base
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw([{"params": params}], lr=1e-4) if params else None
    for _ in range(steps):
        train_step(model, batch_for(spec), optimizer)
    every = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() * p.element_size() for p in every if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in every)
    return {
        "peak_rss_mb": rss_mb(),
        "after_load_rss_mb": before,
        "analytic_mb": (weights + trainable + 2 * trainable) / 2**20,
    }  # weights + grads + AdamW moments


def bench_memory(model_key: str) -> dict:
    out = {}
    for how in TRAIN_CONFIGS:
        result = subprocess.run(
            [sys.executable, __file__, "--memory-child", model_key, how], capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            out[how] = {"error": result.stderr[-500:]}
            continue
        out[how] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# -- 3. inference --------------------------------------------------------------------------------
def randomize_adapters(model, seed: int = 0) -> None:
    """Non-zero B so an unmerged adapter really computes something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def bench_infer(spec: Spec, base, repeats: int) -> dict:

    batch = {k: v for k, v in batch_for(spec).items() if k != "labels"}
    models = {"base": base.eval()}
    for lib in ("lorakit", "peft"):
        for state in ("unmerged", "merged"):
            m = configure(base, spec, f"{lib}-qv").eval()
            randomize_adapters(m)
            if state == "merged":
                lorakit.merge(m) if lib == "lorakit" else m.merge_adapter()
            models[f"{lib}-{state}"] = m
    out = {}
    with torch.inference_mode():
        timer = interleave(
            {k: (lambda m=m: {"forward": timed(lambda: m(**batch))[0]}) for k, m in models.items()}, repeats
        )
        for k in models:
            out[k] = {"forward_ms": timer.median(f"{k}/forward") * 1000}
        if spec.kind == "lm":
            prompt = batch["input_ids"][:4, :32]
            kw = dict(max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
            timer = interleave(
                {
                    k: (lambda m=m: {"generate": timed(lambda: m.generate(input_ids=prompt, **kw))[0]})
                    for k, m in models.items()
                },
                max(3, repeats // 3),
                warmup=1,
            )
            for k in models:
                out[k]["generate_ms"] = timer.median(f"{k}/generate") * 1000
    for k in models:
        for metric in list(out[k]):
            out[k][metric.replace("_ms", "_x_base")] = out[k][metric] / out["base"][metric]
    return out


# -- 4. mixed-adapter batches ---------------------------------------------------------------------
def bench_mixed(repeats: int, counts=(1, 4, 16, 64)) -> dict:
    import peft

    base = gpt2_shaped(layers=4, width=384).eval()
    n_max = max(counts)
    ours = configure(base, SPECS["gpt2"], "lorakit-qv")
    for i in range(1, n_max):
        lorakit.inject(ours, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]), adapter_name=f"a{i}")
    ours_names = ["default"] + [f"a{i}" for i in range(1, n_max)]
    theirs = peft.get_peft_model(
        __import__("copy").deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"])
    )
    for i in range(1, n_max):
        theirs.add_adapter(f"a{i}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    randomize_adapters(ours)
    randomize_adapters(theirs)
    ours.eval(), theirs.eval()
    ids = torch.randint(10, 8192, (64, 32), generator=torch.Generator().manual_seed(0))
    gen_ids = ids[:, :16]
    out = {}
    with torch.inference_mode():
        for n in counts:
            for layout in ("uniform", "skewed"):
                rows = _rows(ours_names[:n], 64, layout)
                runs = {
                    "lorakit-mixed": lambda r=rows: {"t": timed(lambda: _ours_mixed(ours, ids, r))[0]},
                    "peft-adapter_names": lambda r=rows: {
                        "t": timed(lambda: theirs(input_ids=ids, adapter_names=r))[0]
                    },
                    "lorakit-loop": lambda r=rows: {"t": timed(lambda: _loop(ours, ids, r))[0]},
                    "lorakit-single": lambda: {"t": timed(lambda: _single(ours, ids))[0]},
                    "peft-single": lambda: {"t": timed(lambda: theirs(input_ids=ids))[0]},
                }
                timer = interleave(runs, repeats)
                key = f"{n}-{layout}"
                out[key] = {k: timer.median(f"{k}/t") * 1000 for k in runs}
                out[key]["lorakit_x_single"] = out[key]["lorakit-mixed"] / out[key]["lorakit-single"]
                out[key]["peft_x_single"] = out[key]["peft-adapter_names"] / out[key]["peft-single"]
                if layout == "uniform":
                    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
                    gen = {
                        "lorakit-mixed": lambda r=rows, kw=kw: {
                            "t": timed(lambda: _ours_mixed(ours, gen_ids, r, generate=kw))[0]
                        },
                        "peft-adapter_names": lambda r=rows, kw=kw: {
                            "t": timed(lambda: theirs.generate(input_ids=gen_ids, adapter_names=r, **kw))[0]
                        },
                        "lorakit-single": lambda kw=kw: {"t": timed(lambda: _single(ours, gen_ids, generate=kw))[0]},
                        "peft-single": lambda kw=kw: {"t": timed(lambda: theirs.generate(input_ids=gen_ids, **kw))[0]},
                    }
                    timer = interleave(gen, max(3, repeats // 3), warmup=1)
                    out[key]["generate_ms"] = {k: timer.median(f"{k}/t") * 1000 for k in gen}
                    out[key]["generate_lorakit_x_single"] = (
                        out[key]["generate_ms"]["lorakit-mixed"] / out[key]["generate_ms"]["lorakit-single"]
                    )
                    out[key]["generate_peft_x_single"] = (
                        out[key]["generate_ms"]["peft-adapter_names"] / out[key]["generate_ms"]["peft-single"]
                    )
    return out


def _rows(names: list[str], count: int, layout: str) -> list[str]:
    if layout == "uniform":
        return [names[i % len(names)] for i in range(count)]
    # skewed: half the rows on the first adapter, the rest spread over all of them
    return [names[0] if i % 2 == 0 else names[(i // 2) % len(names)] for i in range(count)]


def _ours_mixed(model, ids, rows, generate=None):
    with lorakit.mixed_batch(model, rows):
        return model.generate(input_ids=ids, **generate) if generate else model(input_ids=ids)


def _single(model, ids, generate=None):
    lorakit.set_adapter(model, "default")
    return model.generate(input_ids=ids, **generate) if generate else model(input_ids=ids)


def _loop(model, ids, rows):
    """The naive alternative: one forward per distinct adapter over its own rows."""
    outs = []
    for name in dict.fromkeys(rows):
        index = torch.tensor([i for i, r in enumerate(rows) if r == name])
        lorakit.set_adapter(model, name)
        outs.append((index, model(input_ids=ids[index]).logits))
    return outs


# -- 5. adapter load / switch / merge / unmerge ---------------------------------------------------
def bench_io(spec: Spec, base, repeats: int) -> dict:
    import peft

    tmp = Path(tempfile.mkdtemp())
    for i in range(2):
        m = configure(base, spec, "lorakit-qv")
        randomize_adapters(m, seed=i)
        lorakit.save_adapter(m, tmp / f"a{i}")
    import copy

    ours, theirs = copy.deepcopy(base), None
    out: dict[str, dict] = {"lorakit": {}, "peft": {}}
    t, _ = timed(lambda: lorakit.load_adapter(ours, tmp / "a0", "a0"))
    out["lorakit"]["first_load_ms"] = t * 1000
    t, _ = timed(lambda: lorakit.load_adapter(ours, tmp / "a1", "a1"))
    out["lorakit"]["load_ms"] = t * 1000
    t, theirs = timed(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "a0", adapter_name="a0"))
    out["peft"]["first_load_ms"] = t * 1000
    t, _ = timed(lambda: theirs.load_adapter(tmp / "a1", adapter_name="a1"))
    out["peft"]["load_ms"] = t * 1000
    switches = {"lorakit": lambda n: lorakit.set_adapter(ours, n), "peft": lambda n: theirs.set_adapter(n)}
    for lib, switch in switches.items():
        times = []
        for i in range(max(20, repeats * 4)):
            name = "a1" if i % 2 == 0 else "a0"
            times.append(timed(lambda switch=switch, name=name: switch(name))[0])
        out[lib]["switch_ms"] = sorted(times)[len(times) // 2] * 1000
    lorakit.set_adapter(ours, "a0")
    theirs.set_adapter("a0")
    for lib, (merge, unmerge) in {
        "lorakit": (lambda: lorakit.merge(ours), lambda: lorakit.unmerge(ours)),
        "peft": (theirs.merge_adapter, theirs.unmerge_adapter),
    }.items():
        merges, unmerges = [], []
        for _ in range(max(3, repeats // 2)):
            merges.append(timed(merge)[0])
            unmerges.append(timed(unmerge)[0])
        out[lib]["merge_ms"] = sorted(merges)[len(merges) // 2] * 1000
        out[lib]["unmerge_ms"] = sorted(unmerges)[len(unmerges) // 2] * 1000
    return out


# -- driver ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="train,memory,infer,mixed,io")
    parser.add_argument("--models", default="gpt2,minilm,smollm2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 repeats, GPT-2-shaped only")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "bench.json"))
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    if args.quick:
        args.repeats, args.models = 3, "gpt2"
    sections, models = args.sections.split(","), args.models.split(",")
    out = Path(args.output)
    # Sections not rerun keep their previous results (and their own date and repeats).
    results: dict = json.loads(out.read_text()) if out.is_file() else {}
    results.update(
        {
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
            },
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "repeats": args.repeats,
        }
    )
    for section in sections:
        results.setdefault("section_runs", {})[section] = {"date": results["date"], "repeats": args.repeats}
    import peft

    results["machine"]["peft"] = peft.__version__
    for key in models:
        spec = SPECS[key]
        base = spec.build()
        for section, fn in (("train", bench_train), ("infer", bench_infer), ("io", bench_io)):
            if section in sections and not (section == "io" and key != "smollm2"):
                print(f"[{section}] {spec.name}", flush=True)
                results.setdefault(section, {})[key] = fn(spec, base, args.repeats)
        if "memory" in sections:
            print(f"[memory] {spec.name}", flush=True)
            results.setdefault("memory", {})[key] = bench_memory(key)
        del base
    if "mixed" in sections:
        print("[mixed] GPT-2-shaped 4L/384, 64 rows x 32 tokens", flush=True)
        results["mixed"] = bench_mixed(args.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(report(results))
    print(report(results))


def report(r: dict) -> str:
    """The results as markdown tables (what the README quotes)."""
    lines = [
        f"# lorakit benchmarks ({r['date']}, torch {r['machine']['torch']}, PEFT {r['machine'].get('peft')}, "
        f"{r['machine']['threads']} threads, fp32, r=8, alpha=16; medians of {r['repeats']} interleaved steps)",
        "",
    ]
    if "section_runs" in r:
        lines += [
            "Sections last run: "
            + "; ".join(f"{name} {v['date']} ({v['repeats']} repeats)" for name, v in r["section_runs"].items()),
            "",
        ]
    if "train" in r:
        lines += [
            "## Training step (ms: forward / backward / optimizer = total; x floor; tokens/s)",
            "",
            "| model | config | forward | backward | optimizer | total | x floor | tokens/s | spread |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, rows in r["train"].items():
            for how, v in rows.items():
                lines.append(
                    f"| {SPECS[key].name} | {how} | {v['forward']:.0f} | {v['backward']:.0f} | {v['optimizer']:.1f} | "
                    f"{v['total']:.0f} | {v['x_floor']:.3f} | {v['tokens_per_s']:.0f} | ±{v['spread'] * 50:.0f}% |"
                )
        lines.append("")
    if "memory" in r:
        lines += [
            "## Peak memory (RSS MB in a fresh process; analytic weights + grads + AdamW MB)",
            "",
            "| model | config | peak RSS | analytic |",
            "|---|---|---|---|",
        ]
        for key, rows in r["memory"].items():
            for how, v in rows.items():
                if "error" in v:
                    lines.append(f"| {SPECS[key].name} | {how} | error | |")
                else:
                    lines.append(f"| {SPECS[key].name} | {how} | {v['peak_rss_mb']:.0f} | {v['analytic_mb']:.0f} |")
        lines.append("")
    if "infer" in r:
        lines += [
            "## Inference (x base: batch forward; greedy generate of 16 tokens)",
            "",
            "| model | config | forward ms | x base | generate ms | x base |",
            "|---|---|---|---|---|---|",
        ]
        for key, rows in r["infer"].items():
            for how, v in rows.items():
                gen = f"{v['generate_ms']:.0f} | {v['generate_x_base']:.3f}" if "generate_ms" in v else "- | -"
                lines.append(
                    f"| {SPECS[key].name} | {how} | {v['forward_ms']:.1f} | {v['forward_x_base']:.3f} | {gen} |"
                )
        lines.append("")
    if "mixed" in r:
        lines += [
            "## Mixed-adapter batches (GPT-2-shaped 4L/384, 64 rows x 32 tokens; x one adapter for the whole batch)",
            "",
            "| adapters | layout | lorakit x single | PEFT x single | lorakit ms | PEFT ms | per-adapter loop ms "
            "| generate: lorakit x single | PEFT x single |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, v in r["mixed"].items():
            n, layout = key.split("-")
            gen = (
                f"{v['generate_lorakit_x_single']:.3f} | {v['generate_peft_x_single']:.3f}"
                if "generate_ms" in v
                else "- | -"
            )
            lines.append(
                f"| {n} | {layout} | {v['lorakit_x_single']:.3f} | {v['peft_x_single']:.3f} "
                f"| {v['lorakit-mixed']:.1f} | {v['peft-adapter_names']:.1f} | {v['lorakit-loop']:.1f} | {gen} |"
            )
        lines.append("")
    if "io" in r:
        lines += [
            "## Adapters on SmolLM2-135M (ms)",
            "",
            "| | first load | load | switch | merge | unmerge |",
            "|---|---|---|---|---|---|",
        ]
        for lib, v in r["io"]["smollm2"].items():
            lines.append(
                f"| {lib} | {v['first_load_ms']:.1f} | {v['load_ms']:.1f} | {v['switch_ms']:.4f} "
                f"| {v['merge_ms']:.1f} | {v['unmerge_ms']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
