"""E2E on the anchor's protocol (docs/results.md, "E2E on the anchor's protocol"): SmolLM2-135M-
Instruct, one epoch over 960 shuffled training lines, greedy outputs for E2E test meaning
representations scored by corpus BLEU against all their references.

    python experiments/e2e_protocol.py [--quick] [--config NAME ...]   (default: every configuration)
    python experiments/e2e_protocol.py --dev [--config NAME ...]        (default: DEV_CANDIDATES)

The anchor (PEFT + a plain PyTorch loop; ../shared/notes/anchors.md and issue 18): LoRA q,v r=8,
dropout 0.1, batch 8, lr 1e-3, fp32, an instruction prompt in the chat template with the MR's facts
one per line as `key: value`; BLEU 61.4 on the first 200 distinct test MRs ("set A") and 53.9 on
the next 200 ("set B"). Here every configuration gets the same 960 lines, the same prompt (through
`--prompt-template`), one epoch, seed 0 unless the row names another; it is trained once (run cache),
then generates for both sets in one pass. Writes experiments/results/e2e_protocol.{md,json}.

`--dev` compares candidate defaults where choosing is fair: on a dev split (the MRs of `train.txt`
that none of the 960 training lines shows, with all their references), never on sets A and B.
Writes experiments/results/e2e_protocol_dev.{md,json}.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import E2E, RUNS, markdown_table, parse_args, require_data, run, stopwatch, wall_note, write_results

INSTRUCTION = (
    "Write a one- or two-sentence description of a restaurant for a restaurant guide, using all of the "
    "following facts and adding nothing else.\n\n{prompt}"
)
TRAIN_LINES, SET_SIZE, MAX_NEW_TOKENS = 960, 200, 64
ANCHOR = {"A": 61.4, "B": 53.9, "A zero-shot": 9.6}

# Every run: one epoch over the same 960 lines, fp32, seed 0 unless a row names another. "anchor" is the
# anchor's own recipe; the rest vary one thing at a time from it, to find the defaults (issue 18), the likeliest first.
BASE = dict(targets="q_proj,v_proj", rank=8, alpha=16.0, dropout=0.1, lr=1e-3)
PROTOCOL = dict(epochs=1, batch_size=8)  # the data budget: 960 lines once, batches of 8 (as the anchor)
CONFIGS = {
    "anchor": {},
    "all-linear lr 2e-3": dict(targets="all-linear", lr=2e-3),
    "lr 2e-3": dict(lr=2e-3),
    "all-linear": dict(targets="all-linear"),
    "LoRA+ 16, lr 2e-4": dict(lora_plus_ratio=16.0, lr=2e-4),
    "batch 4": dict(batch_size=4),
    "all-linear lr 2e-3 batch 4": dict(targets="all-linear", lr=2e-3, batch_size=4),
    "all-linear lr 2e-3 seed 1": dict(targets="all-linear", lr=2e-3, seed=1),  # how far BLEU moves by seed
    "lr 5e-4": dict(lr=5e-4),
    "all-linear lr 5e-4": dict(targets="all-linear", lr=5e-4),
    # nothing given but the data and the template: what `lorakit train` picks; three seeds, since
    # set B's BLEU moves by ~1.7 with the seed alone
    "lorakit defaults": {},
    "lorakit defaults seed 1": dict(seed=1),
    "lorakit defaults seed 2": dict(seed=2),
    "lorakit defaults, rank 16": dict(rank=16),  # the next candidates for the defaults
    "lorakit defaults, batch 4": dict(batch_size=4),  # twice the optimizer steps on the same 960 lines
    "lorakit defaults, batch 4 seed 1": dict(batch_size=4, seed=1),  # below batch 8 on both seeds: stopped
    # PiSSA / OLoRA start A, B from W (section 6 of docs/results.md: faster early convergence on E2E)
    "lorakit defaults, olora": dict(init="olora"),
    "lorakit defaults, pissa": dict(init="pissa"),
    # LoRA+ (B's lr x16), the one lever the issue names not yet tried on E2E; A's lr a quarter of the
    # default so that B's (8e-3) stays inside the range the E2E lr grid found stable (1e-3 to 1e-2)
    "lorakit defaults, LoRA+ 16 lr 5e-4": dict(lora_plus_ratio=16.0, lr=5e-4),
    # levers not yet tried, for the dev split's comparison: the anchor's dropout, a higher lr, a cosine decay
    "lorakit defaults, dropout 0.1": dict(dropout=0.1),
    "lorakit defaults, lr 4e-3": dict(lr=4e-3),
    "lorakit defaults, cosine": dict(scheduler="cosine"),
    # the dev split's leader among plain-LoRA settings (seed 0) on two more seeds: judged by its mean dev BLEU
    # against the defaults' three seeds, then reported on A and B. PiSSA led at seed 0; its seeds are still to run.
    "lorakit defaults, lr 4e-3 seed 1": dict(lr=4e-3, seed=1),
    "lorakit defaults, lr 4e-3 seed 2": dict(lr=4e-3, seed=2),
}
DEFAULTS = "lorakit defaults"  # the rows named so take no option from BASE
# compared on the dev split (seed 0): today's defaults, every variant of them, and the anchor's recipe
DEV_CANDIDATES = ("anchor", DEFAULTS) + tuple(n for n in CONFIGS if n.startswith(DEFAULTS + ",") and "seed" not in n)


def facts(mr: str) -> str:
    """'name : Alimentum | area : city centre' -> 'name: Alimentum\narea: city centre'."""
    pairs = [part.split(":", 1) for part in mr.split("|") if ":" in part]
    return "\n".join(f"{key.strip()}: {value.strip()}" for key, value in pairs)


def read_lines(split: str) -> list[tuple[str, str]]:
    rows = []
    for line in (E2E / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        if "||" in line:
            mr, ref = line.split("||", 1)
            rows.append((mr.strip(), ref.strip()))
    return rows


def test_sets() -> dict[str, dict[str, list[str]]]:
    """Set A: the first 200 distinct test MRs (in file order), set B: the next 200; each MR with
    all of its references."""
    refs: dict[str, list[str]] = {}
    for mr, ref in read_lines("test"):
        refs.setdefault(mr, []).append(ref)
    mrs = list(refs)
    return {name: {mr: refs[mr] for mr in mrs[i * SET_SIZE : (i + 1) * SET_SIZE]} for i, name in enumerate("AB")}


def training_lines(quick: bool) -> list[tuple[str, str]]:
    """The (MR, reference) lines every configuration trains on: the first 960 of `train.txt` shuffled."""
    lines = read_lines("train")
    random.Random(0).shuffle(lines)
    return lines[: 32 if quick else TRAIN_LINES]


def dev_set(quick: bool) -> dict[str, list[str]]:
    """The dev split: every MR of `train.txt` that no training line shows (117 of its 547), with all
    of its references there. Unseen MRs, as at test time, scored as sets A and B are."""
    seen = {mr for mr, _ in training_lines(quick)}
    refs: dict[str, list[str]] = {}
    for mr, ref in read_lines("train"):
        if mr not in seen:
            refs.setdefault(mr, []).append(ref)
    return refs


def write_data(folder: Path, quick: bool) -> tuple[Path, Path]:
    """The 960 shuffled training lines and set B's lines (eval loss) as prompt/response JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "train.jsonl"
    rows = training_lines(quick)
    train.write_text("".join(json.dumps({"prompt": facts(mr), "response": ref}) + "\n" for mr, ref in rows))
    evals = folder / "eval_b.jsonl"
    pairs = [(mr, ref) for mr, refs in test_sets()["B"].items() for ref in refs]
    evals.write_text("".join(json.dumps({"prompt": facts(mr), "response": ref}) + "\n" for mr, ref in pairs))
    return train, evals


def config_for(name: str, train: Path, evals: Path) -> dict:
    chosen = CONFIGS[name] if name.startswith(DEFAULTS) else {**BASE, **CONFIGS[name]}
    return dict(model="smollm2-135m", task="causal-lm", data=str(train), eval_data=str(evals),
                **{**PROTOCOL, **chosen}, prompt_template=INSTRUCTION, max_length=256, eval_loss_examples=400,
                eval_batch_size=16, keep=True)  # fmt: skip


def key_for(name: str, config: dict, quick: bool) -> str:
    """The run cache's key; for "lorakit defaults" it names the values the defaults resolve to, so a
    change of defaults trains anew instead of reusing a run of the old ones."""
    key = ("quick-" if quick else "") + "e2e-protocol-" + name.replace(" ", "_").replace(",", "")
    if name.startswith(DEFAULTS):
        from lorakit.train import TrainConfig

        options = {k: v for k, v in config.items() if k != "keep"}
        key += "-" + "-".join(f"{k}{v}" for k, v in sorted(TrainConfig(**options).defaults_chosen.items()))
    return key


def scored(key: str, adapter_dir: str | None, quick: bool, dev: bool = False) -> dict:
    """`score`, cached beside the run cache (generation is half of each configuration's time);
    `dev`: on the dev split, else on sets A and B."""
    from common import CACHE, in_child

    path = CACHE / f"{key}.{'dev' if dev else 'bleu'}.json"
    if path.is_file():
        return json.loads(path.read_text())
    sets = {"dev": dev_set(quick)} if dev else test_sets()
    result, _, _ = in_child(score, adapter_dir, sets, quick)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def score(adapter_dir: str | None, sets: dict[str, dict[str, list[str]]], quick: bool) -> dict[str, float]:
    """Greedy outputs for every MR of `sets` (name -> MR -> references; one pass), corpus BLEU of
    each set against all references; `adapter_dir` None: the base model alone (zero-shot), with the
    same prompts."""
    import torch

    from lorakit.models import load_model, load_tokenizer
    from lorakit.train import metrics
    from lorakit.train.api import load_trained
    from lorakit.train.tasks import make_task

    torch.set_num_threads(2)
    if adapter_dir:
        trained = load_trained(None, adapter_dir)
        model, task = trained.model, trained.task
    else:
        tokenizer = load_tokenizer("smollm2-135m")
        model = load_model("smollm2-135m", "AutoModelForCausalLM").model.eval()
        task = make_task("causal-lm", tokenizer, 256, prompt_template=INSTRUCTION)
    n = 8 if quick else SET_SIZE
    mrs = [mr for refs in sets.values() for mr in list(refs)[:n]]
    outputs = dict(zip(mrs, task.generate(model, [facts(mr) for mr in mrs], batch_size=16,
                                          max_new_tokens=MAX_NEW_TOKENS)))  # fmt: skip
    scores = {}
    for name, refs in sets.items():
        chosen = list(refs)[:n]
        scores[name] = metrics.bleu([outputs[mr] for mr in chosen], [refs[mr] for mr in chosen])
    scores["sample"] = outputs[mrs[-1]]
    return scores


def main() -> None:
    args = parse_args(__doc__, options)
    require_data(E2E)
    clock = stopwatch()
    train, evals = write_data(RUNS / "e2e_protocol_data", args.quick)
    if args.dev:
        return compare_on_dev(args.config or DEV_CANDIDATES, train, evals, clock, args.quick)
    # by configuration, in CONFIGS' order when written; a run of a few --config values keeps the other rows
    rows: dict[str, dict] = {}
    for name in args.config or CONFIGS:  # the results file is rewritten after each, so a stopped sweep keeps what ran
        config = config_for(name, train, evals)
        key = key_for(name, config, args.quick)
        result = run(key, **config)
        bleu = scored(key, result["adapter_dir"], args.quick)
        print(f"  {name}: BLEU A {bleu['A']:.1f}, B {bleu['B']:.1f}", flush=True)
        rows[name] = {"config": name, "options": CONFIGS[name], "bleu_A": bleu["A"], "bleu_B": bleu["B"],
                      "eval_loss_B": result["metrics"].get("loss"), "params": result["trainable_params"],
                      "train_s": result["train_runtime_s"], "tokens_per_s": result["tokens_per_s"],
                      "sample": bleu["sample"], "key": key}  # fmt: skip
        if args.config and not args.quick:  # read just before writing: a sitting beside this one may have added rows
            rows = {**previous_rows(), **rows}
        write([rows[n] for n in CONFIGS if n in rows], None, clock(), args.quick, args.config)
    if args.config:  # a subset: the zero-shot yardstick (9 minutes of generation) comes with a full run
        return
    zero = scored(("quick-" if args.quick else "") + "e2e-protocol-zero-shot", None, args.quick)
    print(f"  zero-shot: BLEU A {zero['A']:.1f}, B {zero['B']:.1f}", flush=True)
    write([rows[n] for n in CONFIGS], zero, clock(), args.quick)


def options(parser) -> None:
    parser.add_argument("--config", choices=tuple(CONFIGS), action="append")
    parser.add_argument("--dev", action="store_true", help="compare on the dev split (default: DEV_CANDIDATES)")


def compare_on_dev(names, train: Path, evals: Path, clock, quick: bool) -> None:
    """Train each configuration (or take it from the run cache) and score it on the dev split; rows
    already in the dev results file stay, so two sittings can share the list."""
    for name in names:
        config = config_for(name, train, evals)
        key = key_for(name, config, quick)
        result = run(key, **config)
        bleu = scored(key, result["adapter_dir"], quick, dev=True)["dev"]
        print(f"  {name}: dev BLEU {bleu:.1f}", flush=True)
        rows = previous_rows("e2e_protocol_dev") if not quick else {}
        rows[name] = {"config": name, "options": CONFIGS[name], "bleu_dev": bleu, "key": key,
                      "eval_loss_B": result["metrics"].get("loss"), "train_s": result["train_runtime_s"]}  # fmt: skip
        table = markdown_table(
            ["configuration (seed 0 unless named)", "BLEU dev", "eval loss (set B)", "train min"],
            [[n, f"{r['bleu_dev']:.1f}", f"{r['eval_loss_B']:.3f}", f"{r['train_s'] / 60:.1f}"]
             for n, r in sorted(rows.items(), key=lambda item: -item[1]["bleu_dev"])],
        )  # fmt: skip
        notes = (
            f"The dev split: the {len(dev_set(quick))} MRs of E2E `train.txt` that none of the {TRAIN_LINES} "
            "training lines shows, each with all of its references there; greedy, the prompt and the training "
            "of `e2e_protocol.md` (seed 0 unless the row names another), sorted by dev BLEU. Here candidate "
            "defaults are chosen; sets A and B stay for the chosen one's report. " + wall_note(clock())
        )
        write_results("e2e_protocol_dev", "E2E protocol: candidate defaults on the dev split", [("BLEU", table)],
                      {"runs": list(rows.values())}, notes, quick)  # fmt: skip


def previous_rows(name: str = "e2e_protocol") -> dict[str, dict]:
    """The rows the results file `name` already holds, by configuration: a run of a few --config
    values adds to the table rather than replacing it."""
    from common import RESULTS

    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    return {row["config"]: row for row in runs if row["config"] in CONFIGS}


def write(rows: list[dict], zero: dict | None, wall: float, quick: bool, only: list[str] | None = None) -> None:
    """`only`: the configurations this sitting ran (--config); the other rows come from earlier ones."""
    zero_row = ["zero-shot base (lorakit)", "0", f"{zero['A']:.1f}", f"{zero['B']:.1f}", "–", "–"] if zero else []
    table = markdown_table(
        ["configuration", "trainable params", "BLEU set A", "BLEU set B", "eval loss (set B)", "train min"],
        [["anchor: PEFT + PyTorch loop", "–", f"{ANCHOR['A']:.1f}", f"{ANCHOR['B']:.1f}", "–", "–"]]
        + ([zero_row] if zero else [])
        + [[r["config"], f"{r['params']:,}", f"{r['bleu_A']:.1f}", f"{r['bleu_B']:.1f}", f"{r['eval_loss_B']:.3f}",
            f"{r['train_s'] / 60:.1f}"] for r in rows],
    )  # fmt: skip
    notes = (
        f"SmolLM2-135M-Instruct (real weights), one epoch over {TRAIN_LINES} shuffled lines of E2E `train.txt` "
        "(seed 0), fp32, 2 threads. Prompt (`--prompt-template`): "
        f"{INSTRUCTION!r}, the MR's facts one per line as `key: value`, in the chat template. Greedy, at most "
        f"{MAX_NEW_TOKENS} new tokens; sacrebleu corpus BLEU (13a) against all references of each MR. Set A: "
        f"the first {SET_SIZE} distinct MRs of `test.txt`, set B: the next {SET_SIZE}. Options not named: "
        f"{BASE} (the anchor's); 'lorakit defaults' gives none of them. Every row: {PROTOCOL}. "
        + wall_note(wall)
        + (f" This sitting ran {', '.join(only)}; the other rows are from earlier sittings." if only else "")
    )
    write_results("e2e_protocol", "E2E on the anchor's protocol", [("BLEU", table)],
                  {"zero_shot": zero, "runs": rows, "anchor": ANCHOR, "wall_s": wall}, notes, quick)  # fmt: skip


if __name__ == "__main__":
    main()
