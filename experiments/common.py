"""Shared helpers for the LoRA-paper experiments in experiments/*.py.

* data paths (../shared/data, or $LORAKIT_DATA) and a clean skip when they are absent;
* `run(key, **config)`: one training run through lorakit's own API (`lorakit.train.api.train`)
  in a fresh forked process, returning its dev metrics, parameter counts, training tokens/s
  and peak memory (the process's VmHWM); results are cached in runs/experiments/cache/<key>.json
  so experiments that share a configuration (e.g. LoRA r=8 on Wq,Wv) train it once;
* `mean_std`, `write_table` (markdown + JSON in experiments/results/) and `savefig`.

Nothing here duplicates the trainer: every run is a `TrainConfig` handed to `train`.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LORAKIT_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "experiments"
CACHE = RUNS / "cache"

SST2 = DATA / "sst2"
DOMAINS_DIR = DATA / "sentiment-domains"
DOMAINS = ("books", "dvd", "electronics", "kitchen", "airline")
E2E = DATA / "e2e"
CONLL = DATA / "conll2003"


def require_data(*paths: Path) -> None:
    """Exit cleanly (status 0, a clear message) when a data set is not on this machine."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(
            f"skip: {', '.join(str(p) for p in missing)} not found (the real data sets are not shipped with "
            "lorakit; put them in ../shared/data or set LORAKIT_DATA)"
        )
        sys.exit(0)


# -- processes --------------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(conn, fn: Callable, args: tuple, kwargs: dict) -> None:
    try:
        base = _rss_kb("VmRSS")
        out = fn(*args, **kwargs)
        conn.send(("ok", out, base, _rss_kb("VmHWM")))
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send(("error", traceback.format_exc(), 0, 0))
    finally:
        conn.close()


# Held while forking and while printing: with runs started from several threads (methods_long
# --jobs), a child must not inherit stdout's lock mid-print, nor another child's pipe end (which
# would hide that child's death from its parent).
FORK_LOCK = threading.Lock()


def say(text: str) -> None:
    with FORK_LOCK:
        print(text, flush=True)


def in_child(fn: Callable, *args, **kwargs) -> tuple[Any, float, float]:
    """Run fn(*args, **kwargs) in a forked process; returns (result, peak_rss_mb, start_rss_mb).
    Peak = the child's VmHWM (resident high-water mark), which includes the interpreter and the
    imported libraries it inherits (start_rss_mb) plus everything the run allocated."""
    ctx = mp.get_context("fork")
    with FORK_LOCK:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
        proc.start()
        child.close()
    try:
        status, out, base, peak = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the child process died (exit code {proc.exitcode}; out of memory?)") from None
    proc.join()
    if status != "ok":
        raise RuntimeError("the run failed in its child process:\n" + out)
    return out, peak / 1024, base / 1024


# -- one training run ---------------------------------------------------------------------------
def _train(config: dict) -> dict:
    import torch

    from lorakit.train.api import train
    from lorakit.train.config import TrainConfig

    torch.set_num_threads(int(os.environ.get("LORAKIT_THREADS", "1")))
    t0 = time.perf_counter()
    result = train(TrainConfig(**config), callbacks=[])
    s = dict(result.summary)
    s["wall_s"] = time.perf_counter() - t0
    return s


USED: list[tuple[dict, bool]] = []  # (row, from the cache?) of every run() in this process


def wall_note(seconds: float) -> str:
    """This invocation's wall time, and what it would have been without the run cache (the
    cached runs' own wall times added: each run's wall time includes loading and evaluation)."""
    cached = [row["wall_s"] for row, hit in USED if hit]
    text = f"Wall time {seconds / 60:.1f} min"
    if cached:
        text += (
            f" ({len(cached)} of its {len(USED)} runs reused from the run cache; run from scratch: about "
            f"{(seconds + sum(cached)) / 60:.1f} min)"
        )
    return text + "."


def run(key: str, keep: bool = False, checkpoint_every: int | None = None, **config: Any) -> dict:
    """Train one configuration (TrainConfig fields) unless runs/experiments/cache/<key>.json
    already holds it; `keep`: keep the trained adapter in runs/experiments/<key>/.
    `checkpoint_every` (steps): for runs longer than a sitting; the run checkpoints that often and a
    killed run resumes from its last checkpoint when started again (exact resume: the same result).
    Not part of the cached configuration, since it does not change what is trained."""
    CACHE.mkdir(parents=True, exist_ok=True)
    cache = CACHE / f"{key}.json"
    output = RUNS / key
    config = {"eval_before": False, "output": str(output), **config}
    if cache.is_file():
        row = json.loads(cache.read_text())
        if row.get("config") == _jsonable(config) and (
            not keep or (output / "adapter_config.json").exists() or (output / "method_config.json").exists()
        ):
            say(f"  {key}: cached")
            USED.append((row, True))
            return row
    say(f"  {key}: training ...")  # a line each: runs may train side by side (--jobs)
    resume = dict(resume=True, save_every=checkpoint_every) if checkpoint_every else {}
    resumed = bool(resume) and any((output / "checkpoints").glob("step-*"))  # times then cover this sitting only
    summary, peak, base = in_child(_train, {**config, **resume})
    final = summary.get("final_eval") or {}
    row = {
        "key": key,
        "config": _jsonable(config),
        "metrics": final,
        "tokens_per_s": summary["tokens_per_s"],
        "train_runtime_s": summary["train_runtime_s"],
        "wall_s": summary["wall_s"],
        "steps": summary["steps"],
        "trainable_params": summary.get("trainable_params"),
        "params_paper": summary.get("trainable_params_paper"),
        "params_head": summary.get("trainable_params_head"),
        "peak_rss_mb": peak,
        "start_rss_mb": base,
        "adapter_dir": str(output) if keep else None,
        **({"resumed": True} if resumed else {}),
    }
    if not keep:
        shutil.rmtree(output, ignore_errors=True)
    else:
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
    cache.write_text(json.dumps(row, indent=1))
    USED.append((row, False))
    shown = ", ".join(f"{k}={v:.3g}" for k, v in final.items() if k in ("accuracy", "loss", "bleu"))
    speed = f"{summary['tokens_per_s']:.0f} tok/s  peak {peak:.0f} MB  {summary['wall_s']:.0f}s"
    say(f"  {key}: {shown}  {speed}")
    return row


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# -- tables and plots ---------------------------------------------------------------------------
def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def fmt_ms(mean: float, std: float, n: int, digits: int = 1) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def fmt_int(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    v = float(v)
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:.0f}"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str, title: str, sections: Sequence[tuple[str, str]], data: Any, notes: str = "", quick: bool = False
) -> Path:
    """experiments/results/<name>.md (title, notes, then each (heading, markdown) section) and
    <name>.json (`data`); a --quick smoke run writes <name>_quick.* and says so in the notes."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if quick:
        name, notes = name + "_quick", notes + " QUICK SMOKE RUN: numbers meaningless."
    parts = [f"# {title}", ""] + ([notes.strip(), ""] if notes else [])
    for heading, body in sections:
        parts += [f"## {heading}", "", body.strip(), ""]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(parts))
    (RESULTS / f"{name}.json").write_text(json.dumps(_jsonable(data), indent=1))
    say(f"wrote {md.relative_to(ROOT)} and {name}.json")
    return md


def savefig(fig, name: str, quick: bool = False) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'_quick' if quick else ''}.png"
    if fig.get_layout_engine() is None:  # figures built with constrained_layout keep it
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stopwatch() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


# -- inference latency at batch 1 -------------------------------------------------------------
LATENCY_VARIANTS = (
    "base",
    "lora (merged)",
    "lora (unmerged)",
    "adapter-h",
    "adapter-l",
    "prefix-embed",
    "prefix-layer",
)


def _latency(
    model_name: str,
    task: str,
    targets: list[str],
    seq_len: int,
    reps: int,
    threads: int,
    variants: Sequence[str],
    rank: int = 8,
    adapter_size: int = 8,
    prefix_length: int = 16,
) -> dict:
    import copy
    import random
    import statistics as st

    import torch

    from lorakit import lora, methods
    from lorakit.models import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from lorakit.train.tasks import task_class

    base = load_model(
        model_name, task_class(task).auto_class, label_names=["0", "1"] if task == "classification" else None
    ).model.eval()
    models = {}
    for name in variants:
        m = copy.deepcopy(base)
        if name.startswith("lora"):
            lora.inject(m, lora.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
            for _, layer in lora.lora_layers(m):  # a trained-looking (non-zero) update
                for p in layer.lora_B.values():
                    torch.nn.init.normal_(p, std=0.01)
            if name == "lora (merged)":
                lora.merge(m)
        elif name != "base":
            m = methods.build(
                m,
                name,
                {"adapter_size": adapter_size}
                if name.startswith("adapter")
                else {"prefix_length": prefix_length, "task": task},
            )
        models[name] = m.eval()
    ids = torch.randint(1000, 5000, (1, seq_len))
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            for m in models.values():
                m(input_ids=ids, attention_mask=mask)
        order = list(models.items())
        for rep in range(reps):  # round robin, in a fresh random order each round:
            random.Random(rep).shuffle(order)  # load spikes and cache effects hit every variant alike
            for n, m in order:
                t0 = time.perf_counter()
                m(input_ids=ids, attention_mask=mask)
                times[n].append(time.perf_counter() - t0)
    return {
        n: {
            "median_ms": 1000 * st.median(t),
            "p10_ms": 1000 * sorted(t)[len(t) // 10],
            "p90_ms": 1000 * sorted(t)[(9 * len(t)) // 10],
            "reps": len(t),
        }
        for n, t in times.items()
    }


def latency(
    model_name: str,
    task: str,
    targets: list[str],
    seq_len: int,
    reps: int,
    threads: int = 1,
    variants: Sequence[str] = LATENCY_VARIANTS,
    **kwargs,
) -> dict:
    """Median forward time at batch 1 (one sequence of `seq_len` tokens) of the base model and
    the same model with each variant applied (fresh, untrained but non-zero), measured
    round-robin in one fresh process."""
    out, _, _ = in_child(_latency, model_name, task, targets, seq_len, reps, threads, variants, **kwargs)
    return out


def latency_table(lat: dict) -> str:
    base = lat.get("base", {}).get("median_ms")
    rows = []
    for name, t in lat.items():
        rel = f"{100 * (t['median_ms'] / base - 1):+.1f}%" if base else "–"
        rows.append([name, f"{t['median_ms']:.2f}", f"{t['p10_ms']:.2f} – {t['p90_ms']:.2f}", rel])
    return markdown_table(["model", "median ms", "p10 – p90 ms", "vs base"], rows)


# -- the shared MiniLM set-ups (identical configs share cached runs across experiments) --------
# Learning rates per method: not tuned here (no budget for it); the usual orders of magnitude
# (full fine-tuning small, bias/prefix tuning large). head_lr=2e-3 trains every method's new head
# (before lorakit applied it to every method, it reached LoRA's head only: see HEAD_LR_FOR_ALL).
METHOD_LR = {
    "lora": 2e-3,
    "full": 1e-4,
    "top2": 2e-4,
    "bitfit": 5e-3,
    "adapter-h": 2e-3,
    "adapter-l": 2e-3,
    "adapter-p": 2e-3,
    "adapter-drop": 2e-3,
    "prefix-embed": 1e-2,
    "prefix-layer": 5e-3,
}
METHOD_OPTIONS = {"adapter_size": 8, "prefix_length": 16}
SST2_STEPS, SST2_BATCH = 80, 32
DOMAIN_STEPS, DOMAIN_BATCH = 40, 16


def sst2_config(method: str = "lora", seed: int = 0, quick: bool = False, **over: Any) -> dict:
    return _classification_config(
        SST2, 4 if quick else SST2_STEPS, SST2_BATCH, 64 if quick else None, method, seed, over
    )


def domain_config(domain: str, method: str = "lora", seed: int = 0, quick: bool = False, **over: Any) -> dict:
    return _classification_config(
        DOMAINS_DIR / domain, 4 if quick else DOMAIN_STEPS, DOMAIN_BATCH, 32 if quick else None, method, seed, over
    )


def _classification_config(
    data_dir: Path, steps: int, batch: int, max_eval: int | None, method: str, seed: int, over: dict
) -> dict:
    """MiniLM on a train.tsv / dev.tsv pair: `steps` steps of `batch` on a random subset."""
    config = dict(
        model="minilm",
        task="classification",
        data=str(data_dir / "train.tsv"),
        eval_data=str(data_dir / "dev.tsv"),
        method=method,
        targets=["query", "value"] if method == "lora" else None,
        rank=8,
        alpha=16.0,
        lr=METHOD_LR[method],
        head_lr=2e-3,
        batch_size=batch,
        max_length=64,
        max_steps=steps,
        max_train_examples=steps * batch,
        max_eval_examples=max_eval,
        seed=seed,
        **METHOD_OPTIONS,
    )
    config.update(over)
    return config


# Cached runs of the non-LoRA methods from before head_lr reached their heads trained those heads at
# the method's lr: a new key suffix keeps them from being reused as if they were current.
HEAD_LR_FOR_ALL = "-hl"


def conll_config(steps: int, batch: int, seed: int = 0, quick: bool = False, **over: Any) -> dict:
    """MiniLM on CoNLL-2003: `steps` steps of `batch` sentences (4 when quick), max length 128, the
    full dev set (64 sentences when quick)."""
    return dict(model="minilm", task="ner", data=str(CONLL / "train.txt"), eval_data=str(CONLL / "dev.txt"),
                batch_size=batch, max_length=128, max_steps=4 if quick else steps,
                max_eval_examples=64 if quick else None, seed=seed, **over)  # fmt: skip


def key_of(prefix: str, config: dict, quick: bool) -> str:
    t = config.get("targets") or []
    what = config["method"] + (
        f"-{'+'.join(x[0] for x in t)}-r{config['rank']}" if config["method"] == "lora" else HEAD_LR_FOR_ALL
    )
    return ("quick-" if quick else "") + f"{prefix}-{what}-s{config['seed']}"


def parse_args(description: str, extra: Callable | None = None):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (a few steps, small eval sets)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: the experiment's)")
    if extra:
        extra(p)
    return p.parse_args()
