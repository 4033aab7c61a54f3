"""Generate lorakit's built-in demo data set: compositional product-review sentiment.

Run `python src/lorakit/data/make_demo_data.py` to (re)write `demo/train.jsonl` and
`demo/dev.jsonl` next to this file. The output is deterministic (fixed seed), and
every sentence is built here from our own word lists: no public data set is used.

Why this task: the label depends on how the words are put together, not on which
words occur. A review mixes a positive and a negative clause and the connective
decides which one counts ("great screen, but the battery died" is negative; swap
the clauses and it is positive), and negation flips a clause ("not bad at all").
A frozen sentence encoder averages the words, so a linear head on top of it stays
well short of the mark, while adapting the encoder's attention (LoRA) learns the
composition rules and gets most of the remaining way.

Dev measures generalisation: its products, aspects, adjectives, events and opening
phrases are all held out from train, so no dev sentence (nor a relabelled
near-copy) can be memorised; only the composition rules are shared.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 20240611
SIZES = {"train": 2000, "dev": 400}
LABELS = ("negative", "positive")


@dataclass(frozen=True)
class Vocab:
    """The word lists one split draws from (train and dev get disjoint ones)."""

    aspects: tuple[str, ...]
    good: tuple[str, ...]  # adjectives
    bad: tuple[str, ...]
    good_events: tuple[str, ...]  # "{a}" is replaced by an aspect
    bad_events: tuple[str, ...]
    openers: tuple[str, ...]


TRAIN = Vocab(
    aspects=(
        "screen",
        "battery",
        "keyboard",
        "camera",
        "speaker",
        "charger",
        "strap",
        "lid",
        "handle",
        "zipper",
        "lens",
        "headphones",
        "mattress",
        "blender",
        "kettle",
        "backpack",
        "printer",
        "router",
        "mouse",
        "drill",
    ),
    good=(
        "great",
        "excellent",
        "fantastic",
        "reliable",
        "sturdy",
        "bright",
        "fast",
        "comfortable",
        "quiet",
        "lovely",
        "impressive",
        "well made",
        "amazing",
        "perfect",
        "terrific",
        "elegant",
        "handy",
        "robust",
        "accurate",
        "efficient",
        "beautiful",
        "good",
        "sleek",
        "powerful",
        "convenient",
        "nice",
    ),
    bad=(
        "terrible",
        "awful",
        "flimsy",
        "slow",
        "noisy",
        "cheaply made",
        "disappointing",
        "useless",
        "uncomfortable",
        "dim",
        "fragile",
        "horrible",
        "bad",
        "broken",
        "defective",
        "weak",
        "ugly",
        "inaccurate",
        "annoying",
        "overpriced",
        "unstable",
        "leaky",
        "buggy",
        "worthless",
        "inferior",
        "frustrating",
    ),
    good_events=(
        "the {a} works perfectly",
        "the {a} arrived a day early",
        "the {a} still works after a year",
        "setting up the {a} took two minutes",
        "the {a} exceeded my expectations",
        "I use the {a} every day and love it",
        "the {a} works like a charm",
        "the {a} does exactly what it promises",
        "I am very happy with the {a}",
        "the {a} is worth every penny",
        "I recommend the {a} to everyone",
        "the {a} has never let me down",
    ),
    bad_events=(
        "the {a} broke after a week",
        "the {a} died in an hour",
        "the {a} stopped working",
        "the {a} arrived scratched",
        "I had to return the {a} twice",
        "the {a} fell apart in a month",
        "the {a} is a waste of money",
        "I want a refund for the {a}",
        "the {a} keeps crashing",
        "the {a} never worked properly",
        "the {a} smells of burnt plastic",
        "I am very unhappy with the {a}",
    ),
    openers=("", "", "", "honestly, ", "overall, ", "in short, ", "to sum up, "),
)

DEV = Vocab(
    aspects=(
        "display",
        "fan",
        "hinge",
        "remote",
        "trackpad",
        "microphone",
        "cable",
        "sole",
        "blade",
        "pump",
        "toaster",
        "tent",
        "stroller",
        "monitor",
        "webcam",
        "vacuum",
    ),
    good=(
        "superb",
        "wonderful",
        "solid",
        "smooth",
        "durable",
        "brilliant",
        "pleasant",
        "outstanding",
        "dependable",
        "fabulous",
        "splendid",
        "first-rate",
    ),
    bad=(
        "dreadful",
        "poor",
        "shoddy",
        "sluggish",
        "unreliable",
        "mediocre",
        "clunky",
        "pathetic",
        "faulty",
        "lousy",
        "subpar",
        "atrocious",
    ),
    good_events=(
        "the {a} runs flawlessly",
        "the {a} survived a drop without a scratch",
        "I would gladly buy the {a} again",
        "the {a} is a joy to use",
        "the {a} is a real bargain",
        "the {a} made my life easier",
    ),
    bad_events=(
        "the {a} cracked on day one",
        "the {a} overheats constantly",
        "the {a} quit after two uses",
        "I regret buying the {a}",
        "the {a} is a total letdown",
        "the {a} came with parts missing",
    ),
    openers=("", "", "", "frankly, ", "all in all, ", "long story short, "),
)


def be(aspect: str) -> str:
    """The verb 'to be' agreeing with `aspect`."""
    return "are" if aspect == "headphones" else "is"


def plain_clause(rng: random.Random, v: Vocab, positive: bool, a: str) -> str:
    """A clause about aspect `a` stating its polarity directly."""
    if rng.random() < 0.5:
        adj = rng.choice(v.good if positive else v.bad)
        return f"the {a} {be(a)} {rng.choice(('', '', 'really ', 'truly '))}{adj}"
    return rng.choice(v.good_events if positive else v.bad_events).format(a=a)


def negated_clause(rng: random.Random, v: Vocab, positive: bool, a: str) -> str:
    """A clause about aspect `a` whose polarity is the opposite of its adjective's."""
    adj = rng.choice(v.bad if positive else v.good)
    form = rng.choice(
        (
            "the {a} {v} not {adj}",
            "the {a} {v} not {adj} at all",
            "the {a} {v}n't {adj}",
            "the {a} {v} far from {adj}",
            "the {a} {v} anything but {adj}",
            "I would not call the {a} {adj}",
            "nobody could call the {a} {adj}",
        )
    )
    return form.format(a=a, v=be(a), adj=adj)


def clause(rng: random.Random, v: Vocab, positive: bool, a: str) -> str:
    """A plain or negated clause about aspect `a` with the given polarity."""
    make = negated_clause if rng.random() < 0.4 else plain_clause
    return make(rng, v, positive, a)


def sentence(rng: random.Random, v: Vocab, positive: bool) -> str:
    """One review whose overall polarity is `positive`.

    Most reviews contrast two clauses of opposite polarity, so both polarities'
    words are present and only the structure tells which one wins.
    """
    # Two different aspects, so the clauses read as a trade-off, not a contradiction.
    a, b = rng.sample(v.aspects, 2)
    main, other = clause(rng, v, positive, a), clause(rng, v, not positive, b)
    shape = rng.random()
    if shape < 0.2:
        body = main
    elif shape < 0.45:
        body = f"{other}, but {main}"
    elif shape < 0.6:
        body = f"although {other}, {main}"
    elif shape < 0.75:
        body = f"{main}, even though {other}"
    elif shape < 0.9:
        body = f"{other}; however, {main}"
    else:
        body = f"{main}, despite the fact that {other}"
    text = rng.choice(v.openers) + body + rng.choice((".", ".", "!"))
    return text[0].upper() + text[1:]


def make_split(rng: random.Random, v: Vocab, n: int, exclude: set[str]) -> list[dict]:
    """`n` distinct rows, labels exactly balanced, none of whose texts are in `exclude`."""
    rows: list[dict] = []
    seen = set(exclude)
    while len(rows) < n:
        positive = len(rows) % 2 == 1
        text = sentence(rng, v, positive)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": LABELS[positive]})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(out_dir: Path = Path(__file__).resolve().parent / "demo") -> None:
    rng = random.Random(SEED)
    train = make_split(rng, TRAIN, SIZES["train"], exclude=set())
    dev = make_split(rng, DEV, SIZES["dev"], exclude={r["text"] for r in train})
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "dev.jsonl", dev)
    print(f"wrote {len(train)} train and {len(dev)} dev rows to {out_dir}")


if __name__ == "__main__":
    main()
