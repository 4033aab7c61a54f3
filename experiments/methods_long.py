"""The methods tables at budgets where orderings settle (issue 18): every method on SST-2 (MiniLM,
800 steps of batch 32) and one sentiment domain (MiniLM, 400 steps of batch 16); the paper's E2E
baselines on E2E (SmolLM2-135M, one epoch of its 4,672 training lines at batch 8). Each method's
learning rate is chosen on the dev set from one grid (the same three values for every method) at a
quarter of the budget, seed 0; then the chosen lr runs at the full budget with 2 seeds. The first
row runs LoRA with lorakit's defaults (no lr, rank, alpha or targets given).

    python experiments/methods_long.py [--part sst2|domain|e2e] [--jobs N] [--quick]

E2E has no dev split here (train.txt is the official validation split, test.txt the test split), so its
grid holds out the last E2E_DEV_MRS meaning representations of train.txt (all their references) as a
dev set, trains on the rest and picks by dev loss; the full-budget runs then train on all of train.txt
and report test loss and BLEU. Every run is cached (runs/experiments/cache), so the parts can run in
separate sittings; an E2E run (up to an hour or two) also checkpoints every CHECKPOINT_EVERY steps and
resumes from there. `--jobs N` trains N runs at once (one thread each): every run that waits on no
result (each method's grid, the defaults row) is queued up front. Writes
experiments/results/methods_long_<part>.{md,json}.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DOMAINS_DIR,
    E2E,
    RUNS,
    SST2,
    domain_config,
    fmt_int,
    fmt_ms,
    markdown_table,
    mean_std,
    parse_args,
    require_data,
    run,
    sst2_config,
    stopwatch,
    wall_note,
    write_results,
)

GRID = (1e-4, 1e-3, 1e-2)  # the same three values for every method
SEEDS = (0, 1)
DOMAIN = "electronics"
# The runs most read first (a part left unfinished still has them): LoRA as users run it, then its baselines.
ENCODER_METHODS = ("lora (defaults)", "lora", "full", "adapter-h", "adapter-p", "adapter-l", "adapter-drop",
                   "prefix-layer", "prefix-embed", "top2", "bitfit")  # fmt: skip
# E2E: the paper's own E2E baselines (its Table 3: full, top2, adapter-L/H, prefix-layer, LoRA). A one-epoch
# SmolLM2 run costs 35-70 CPU-minutes here, so adapter-p/-drop (its Table 2 only) and prefix-embed stay on
# the encoder tables, and bitfit too (LLaMA-style models have no biases).
DECODER_METHODS = ("lora (defaults)", "lora", "full", "adapter-h", "adapter-l", "prefix-layer", "top2")
# part -> (steps, batch, the dev metric that picks the lr, whether higher is better)
PARTS = {"sst2": (800, 32, "accuracy", True), "domain": (400, 16, "accuracy", True), "e2e": (584, 8, "loss", False)}
E2E_LOSS_LINES, E2E_BLEU_MRS, E2E_DEV_MRS = 400, 100, 50
CHECKPOINT_EVERY = {"e2e": 50}  # steps; ~10 minutes of one thread


def e2e_split(quick: bool) -> tuple[Path, Path]:
    """train.txt without its last E2E_DEV_MRS meaning representations, and those as a dev set (lines are
    grouped by MR, so no dev MR is seen in training). Written once under runs/; derived, not committed."""
    folder = RUNS / (("quick-" if quick else "") + "methods_long_e2e_split")
    train, dev = folder / "train.txt", folder / "dev.txt"
    if not dev.is_file():
        lines = (E2E / "train.txt").read_text(encoding="utf-8").splitlines()
        mrs = list(dict.fromkeys(line.split("||")[0] for line in lines))
        held = set(mrs[-E2E_DEV_MRS:])
        folder.mkdir(parents=True, exist_ok=True)
        train.write_text("".join(f"{x}\n" for x in lines if x.split("||")[0] not in held), encoding="utf-8")
        dev.write_text("".join(f"{x}\n" for x in lines if x.split("||")[0] in held), encoding="utf-8")
    return train, dev


def config(part: str, method: str, lr: float | None, seed: int, steps: int, quick: bool) -> dict:
    """One run of `method` (lr None: lorakit's defaults, nothing else given) at `steps` steps."""
    _, batch, _, _ = PARTS[part]
    grid_run = steps < PARTS[part][0]
    steps = 3 if quick else steps
    if part == "e2e":  # grid: dev loss only; full budget: test loss and BLEU
        train, dev = e2e_split(quick) if grid_run else (E2E / "train.txt", E2E / "test.txt")
        bleu = 0 if grid_run or method == "prefix-embed" else (4 if quick else E2E_BLEU_MRS)
        c = dict(model="smollm2-135m", task="causal-lm", data=str(train), eval_data=str(dev),
                 method=method, batch_size=batch, max_length=96, max_steps=steps,
                 max_train_examples=min(steps * batch, 4672), eval_loss_examples=16 if quick else E2E_LOSS_LINES,
                 eval_generate=bleu, eval_batch_size=16, max_new_tokens=64, adapter_size=8, prefix_length=16,
                 seed=seed)  # fmt: skip
    else:
        make = sst2_config if part == "sst2" else (lambda *a, **k: domain_config(DOMAIN, *a, **k))
        c = make(method, seed, quick)
        c.update(max_steps=steps, max_train_examples=steps * batch)
        c.pop("head_lr")  # the head learns at the method's lr, as a user's run without --head-lr does
        if method == "lora":
            c.pop("targets")  # the task's default targets, as lorakit train picks them
            c.update(rank=8, alpha=16.0)
    if lr is None:  # lorakit's defaults: leave every setting the defaults cover unset
        for name in ("lr", "rank", "alpha", "targets"):
            c.pop(name, None)
    else:
        c["lr"] = lr
    return c


def key(part: str, method: str, lr: float | None, seed: int, steps: int, quick: bool) -> str:
    """The run cache's key; the defaults row's names the values the defaults resolve to, so a change of
    defaults trains anew rather than reusing a run of the old ones (its config leaves them unset)."""
    tag = f"lr{lr}"
    if lr is None:
        from lorakit.train import TrainConfig

        chosen = TrainConfig(**config(part, method, lr, seed, steps, quick)).defaults_chosen
        tag = "default-" + "-".join(f"{k}{v}" for k, v in sorted(chosen.items()))
    return ("quick-" if quick else "") + f"long-{part}-{method}-{tag}-n{steps}-s{seed}"


POOL = ThreadPoolExecutor(max_workers=1)  # --jobs: each worker waits on one run's child process
STARTED: dict[str, Future] = {}  # key -> the run, queued or done (each trains once)


def start(part: str, method: str, lr: float | None, seed: int, steps: int, quick: bool) -> Future:
    name = key(part, method, lr, seed, steps, quick)
    if name not in STARTED:
        STARTED[name] = POOL.submit(run, name, checkpoint_every=CHECKPOINT_EVERY.get(part),
                                    **config(part, method, lr, seed, steps, quick))  # fmt: skip
    return STARTED[name]


def grid_runs(part: str, name: str, steps: int, quick: bool) -> dict[float, Future]:
    """`name`'s lr grid: a quarter of the budget, seed 0."""
    return {lr: start(part, name, lr, 0, steps // 4, quick) for lr in GRID}


def queue_independent(part: str, methods: tuple[str, ...], steps: int, quick: bool) -> None:
    """Queue, in table order, the runs that wait on no result: the defaults row, every grid."""
    for method in methods:
        if method == "lora (defaults)":
            seeds_of(part, method, steps, quick)
        else:
            grid_runs(part, method.split(" ")[0], steps, quick)


def score(part: str, row: dict) -> float:
    return row["metrics"].get(PARTS[part][2], float("nan"))


def seeds_of(
    part: str, method: str, steps: int, quick: bool, wait: bool = True
) -> tuple[float | None, dict[float, float], list[Future]] | None:
    """Start `method`'s full-budget runs (one per seed) at the lr its grid chose; returns (lr, grid,
    the runs' futures), or None when `wait` is False and its grid has not finished yet."""
    name = method.split(" ")[0]
    if method == "lora (defaults)":
        return None, {}, [start(part, name, None, s, steps, quick) for s in SEEDS]
    graded = grid_runs(part, name, steps, quick)
    if not wait and not all(f.done() for f in graded.values()):
        return None
    grid = {g: score(part, f.result()) for g, f in graded.items()}
    ok = {g: s for g, s in grid.items() if s == s}  # a diverged run scores NaN
    _, _, _, higher = PARTS[part]
    lr = (max if higher else min)(ok, key=ok.get) if ok else GRID[0]
    return lr, grid, [start(part, name, lr, s, steps, quick) for s in SEEDS]


def run_part(part: str, quick: bool, jobs: int = 1) -> Iterator[tuple[str, list[dict]]]:
    """Yields the table so far (markdown, rows) after each method, so an interrupted part still reports."""
    steps, _, metric, _ = PARTS[part]
    methods = DECODER_METHODS if part == "e2e" else ENCODER_METHODS
    if jobs > 1:  # one at a time, the runs go in table order instead
        queue_independent(part, methods, steps, quick)
    rows, md = [], []
    columns = ["method", "trainable params", "chosen lr", f"grid (dev {metric}, quarter budget)", f"{metric} (2 seeds)"]
    for i, method in enumerate(methods):
        lr, grid, started = seeds_of(part, method, steps, quick)
        if jobs > 1:  # queue the later methods whose grids are done: no worker waits on this method's slower seed
            for later in methods[i + 1 :]:
                seeds_of(part, later, steps, quick, wait=False)
        runs = [future.result() for future in started]
        main, extra = mean_std(score(part, r) for r in runs), mean_std(r["metrics"].get("bleu") for r in runs)
        rows.append({"method": method, "lr": lr, "grid": grid, "params": runs[0]["params_paper"], metric: main[0],
                     f"{metric}_std": main[1], "bleu": extra[0], "bleu_std": extra[1],
                     "train_s": [r["train_runtime_s"] for r in runs]})  # fmt: skip
        grid_text = ", ".join(f"{g:g}: {s:.{3 if metric == 'loss' else 1}f}" for g, s in grid.items()) or "–"
        shown = [fmt_ms(*main, digits=3 if metric == "loss" else 1)] + ([fmt_ms(*extra)] if part == "e2e" else [])
        md.append([method, fmt_int(runs[0]["params_paper"]), "default" if lr is None else f"{lr:g}", grid_text, *shown])
        yield markdown_table(columns + (["BLEU (2 seeds)"] if part == "e2e" else []), md), rows


def main() -> None:
    def options(p):
        p.add_argument("--part", choices=tuple(PARTS), action="append")
        p.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")

    args = parse_args(__doc__, options)
    global POOL
    POOL = ThreadPoolExecutor(max_workers=args.jobs)
    parts = args.part or list(PARTS)
    require_data(*[{"sst2": SST2, "domain": DOMAINS_DIR / DOMAIN, "e2e": E2E}[p] for p in parts])
    for part in parts:
        clock = stopwatch()
        print(f"{part}:")
        steps, batch, metric, _ = PARTS[part]
        methods = DECODER_METHODS if part == "e2e" else ENCODER_METHODS
        for done, (table, rows) in enumerate(run_part(part, args.quick, args.jobs), 1):
            wall = clock()
            held = f" (a dev set held out of train.txt: its last {E2E_DEV_MRS} meaning representations)"
            todo = f" Still to run: {', '.join(methods[done:])}." if done < len(methods) else ""
            notes = (
                f"{part}: {steps} steps of batch {batch}, seeds {list(SEEDS)}; lr grid {list(GRID)} at {steps // 4} "
                f"steps, seed 0, chosen by dev {metric}{held if part == 'e2e' else ''}. LoRA r=8 alpha 16 on the "
                "task's default targets; adapters bottleneck 8 (adapter-drop: the lowest block without); prefixes 16 "
                "positions. " + wall_note(wall) + todo
            )
            write_results(f"methods_long_{part}", f"Methods at settled budgets: {part}", [(part, table)],
                          {"rows": rows, "wall_s": wall}, notes, args.quick)  # fmt: skip


if __name__ == "__main__":
    main()
