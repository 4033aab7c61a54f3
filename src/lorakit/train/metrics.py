"""Evaluation metrics as small pure functions over plain Python lists.

Units: accuracy, F1, precision, recall, BLEU and ROUGE-L are percentages (0-100), as papers
and leaderboards report them; perplexity is a plain ratio (>= 1). Labels are compared as
given, so pass strings (or ints) consistently for predictions and references.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

__all__ = [
    "accuracy",
    "bleu",
    "classification_scores",
    "f1",
    "macro_f1",
    "ner_scores",
    "perplexity",
    "rouge_l",
]


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Percentage (0-100) of predictions equal to their reference."""
    _check_lengths(predictions, references)
    return 100.0 * sum(p == r for p, r in zip(predictions, references)) / len(references)


def f1(predictions: Sequence[Hashable], references: Sequence[Hashable], positive: Hashable) -> float:
    """F1 (0-100) of the ``positive`` class: 2TP / (2TP + FP + FN), 0 when that is 0/0."""
    _check_lengths(predictions, references)
    return _class_f1(predictions, references, positive)


def macro_f1(
    predictions: Sequence[Hashable], references: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> float:
    """Unweighted mean of per-class F1 (0-100) over ``labels``.

    ``labels`` defaults to every class seen in references or predictions (as scikit-learn does);
    passing the full label list also counts classes absent from both, each with F1 = 0.
    """
    _check_lengths(predictions, references)
    labels = labels if labels is not None else sorted(set(references) | set(predictions), key=str)
    return sum(_class_f1(predictions, references, label) for label in labels) / len(labels)


def classification_scores(
    predictions: Sequence[Hashable], references: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> dict[str, float]:
    """``{'accuracy', 'f1', 'macro_f1'}``, all in percent (0-100).

    ``f1`` is the usual headline number: for two labels the F1 of the positive class, which is
    the last of the sorted ``labels`` (``'1'`` of ``'0'/'1'``, ``'positive'`` of
    ``'negative'/'positive'``); for more labels the macro F1. ``labels`` defaults to the sorted
    classes seen in references or predictions; pass the label map to fix it.
    """
    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions), key=str)
    macro = macro_f1(predictions, references, labels)
    headline = f1(predictions, references, positive=labels[-1]) if len(labels) == 2 else macro
    return {"accuracy": accuracy(predictions, references), "f1": headline, "macro_f1": macro}


def ner_scores(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level ``{'precision', 'recall', 'f1'}`` in percent (0-100) for BIO tag sequences.

    An entity counts only when its type and exact span match (seqeval's default, conlleval-
    compatible mode, where a stray ``I-X`` also starts an entity).
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    _check_lengths(predictions, references)
    for i, (p, r) in enumerate(zip(predictions, references)):
        if len(p) != len(r):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags but {len(r)} reference tags")
    predictions, references = [list(p) for p in predictions], [list(r) for r in references]
    # zero_division=0: no predicted (or no gold) entities scores 0 instead of warning.
    return {
        name: 100.0 * float(score(references, predictions, zero_division=0))
        for name, score in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score))
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats), a ratio >= 1; ``inf`` when it overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:  # an untrained or diverged model; inf is the honest answer
        return math.inf


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """Corpus BLEU (0-100) with any number of references per hypothesis.

    sacrebleu's defaults: 13a tokenization, case-sensitive, up to 4-grams, brevity penalty from
    the closest reference length, 'exp' smoothing only for an n-gram order without matches.

    ``references[i]`` is the list of references of ``hypotheses[i]`` (a plain string means one).
    Counts may differ per hypothesis: sacrebleu wants reference *streams* of equal length,
    so shorter lists are padded with ``None``, which it skips. (Padding with ``''`` would
    add an empty reference that can win the closest-length brevity computation.)
    """
    from sacrebleu.metrics import BLEU

    _check_lengths(hypotheses, references)
    per_hypothesis = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    if any(not refs for refs in per_hypothesis):
        raise ValueError("every hypothesis needs at least one reference")
    width = max(len(refs) for refs in per_hypothesis)
    padded = [refs + [None] * (width - len(refs)) for refs in per_hypothesis]
    streams = [list(stream) for stream in zip(*padded)]  # transpose: one stream per reference slot
    return float(BLEU().corpus_score(list(hypotheses), streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str] | str], use_stemmer: bool = True) -> float:
    """Mean ROUGE-L F-measure (0-100) over hypotheses; with several references the best one counts.

    Uses Google's ``rouge-score``, whose tokenizer lowercases and keeps only ``[a-z0-9]`` runs:
    text in other scripts scores 0 unless transliterated.
    """
    from rouge_score.rouge_scorer import RougeScorer

    _check_lengths(hypotheses, references)
    scorer = RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    total = 0.0
    for hypothesis, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        total += scorer.score_multi(refs, hypothesis)["rougeL"].fmeasure
    return 100.0 * total / len(hypotheses)


def _class_f1(predictions: Sequence[Hashable], references: Sequence[Hashable], label: Hashable) -> float:
    tp = sum(p == label and r == label for p, r in zip(predictions, references))
    fp = sum(p == label and r != label for p, r in zip(predictions, references))
    fn = sum(p != label and r == label for p, r in zip(predictions, references))
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
