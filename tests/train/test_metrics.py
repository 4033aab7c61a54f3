"""Tests for lorakit.train.metrics against values worked out by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest

from lorakit.train.metrics import (
    accuracy,
    bleu,
    classification_scores,
    f1,
    macro_f1,
    ner_scores,
    perplexity,
    rouge_l,
)


def test_binary_classification_scores():
    predictions = ["1", "0", "1", "1"]
    references = ["1", "0", "0", "1"]
    # accuracy: 3 of 4 right.
    # class '1': TP=2 FP=1 FN=0 -> F1 = 2*2 / (2*2 + 1 + 0) = 4/5
    # class '0': TP=1 FP=0 FN=1 -> F1 = 2*1 / (2*1 + 0 + 1) = 2/3
    scores = classification_scores(predictions, references)
    assert scores["accuracy"] == pytest.approx(75.0)
    assert scores["f1"] == pytest.approx(100 * 4 / 5)  # the positive class, '1'
    assert scores["macro_f1"] == pytest.approx(100 * (4 / 5 + 2 / 3) / 2)
    assert f1(predictions, references, positive="0") == pytest.approx(100 * 2 / 3)


def test_positive_class_is_last_of_the_given_labels():
    # 'pos' is never predicted; the label map still makes it the positive class.
    scores = classification_scores(["neg", "neg"], ["neg", "pos"], labels=["neg", "pos"])
    # class 'pos': TP=0 FP=0 FN=1 -> F1 = 0 ; class 'neg': TP=1 FP=1 FN=0 -> 2/3
    assert scores["f1"] == 0.0
    assert scores["macro_f1"] == pytest.approx(100 * (2 / 3 + 0) / 2)


def test_multiclass_f1_is_macro():
    predictions = ["a", "b", "c", "a"]
    references = ["a", "b", "b", "c"]
    # a: TP=1 FP=1 FN=0 -> 2/3 ; b: TP=1 FP=0 FN=1 -> 2/3 ; c: TP=0 FP=1 FN=1 -> 0
    expected = 100 * (2 / 3 + 2 / 3 + 0) / 3
    scores = classification_scores(predictions, references)
    assert scores == pytest.approx({"accuracy": 50.0, "f1": expected, "macro_f1": expected})
    # A class absent from both sides counts as F1 0 only when listed explicitly.
    assert macro_f1(predictions, references, labels=["a", "b", "c", "d"]) == pytest.approx(expected * 3 / 4)


def test_accuracy_checks_lengths_and_emptiness():
    assert accuracy([1, 2, 3], [1, 2, 4]) == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


def test_ner_scores_are_entity_level():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predictions = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-MISC"]]
    # gold entities: PER, LOC, ORG (3); predicted: PER, ORG, ORG, MISC (4); correct: PER, ORG (2)
    precision, recall = 2 / 4, 2 / 3
    scores = ner_scores(predictions, references)
    assert scores["precision"] == pytest.approx(100 * precision)
    assert scores["recall"] == pytest.approx(100 * recall)
    assert scores["f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))


def test_ner_partial_span_is_wrong_and_lengths_must_match():
    # Token accuracy would be 50%, but the only entity's span is cut short: nothing is right.
    assert ner_scores([["B-PER", "O"]], [["B-PER", "I-PER"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags but 2"):
        ner_scores([["O"]], [["O", "O"]])


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10)) == pytest.approx(10.0)
    assert perplexity(1e6) == math.inf


def test_bleu_single_reference():
    # hyp 'a b c d e' vs ref 'a b c d f': n-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths -> BP=1
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4)
    assert bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx(expected)
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(expected)  # a bare string is one reference


def test_bleu_clips_against_the_best_reference():
    # Every n-gram of 'a b c d e' occurs in one of the two references: all precisions 1.
    assert bleu(["a b c d e"], [["a b c d x", "y b c d e"]]) == pytest.approx(100.0)


def test_bleu_variable_reference_counts():
    hypotheses = ["a b c d", "p q"]
    references = [["a b c d", "a b c d e f g h"], ["p q r s t u"]]
    # Matches: 1-grams 4+2 of 6, 2-grams 3+1 of 4, 3-grams 2+0 of 2, 4-grams 1+0 of 1: all precisions 1.
    # Hypothesis length c = 4 + 2 = 6; closest reference lengths r = 4 + 6 = 10; BP = exp(1 - r/c).
    # (Padding the second list with '' instead of None would make r = 4 + 0 and BLEU 100.)
    assert bleu(hypotheses, references) == pytest.approx(100 * math.exp(1 - 10 / 6))


def test_bleu_needs_references():
    with pytest.raises(ValueError, match="at least one reference"):
        bleu(["a"], [[]])


def test_rouge_l():
    # 'the cat sat' vs 'the cat was here': LCS = 'the cat' = 2; P = 2/3, R = 2/4
    # F = 2PR / (P + R) = 4/7. The second pair is identical: F = 1.
    expected = 100 * (4 / 7 + 1) / 2
    assert rouge_l(["the cat sat", "a b"], ["the cat was here", "a b"]) == pytest.approx(expected)


def test_rouge_l_takes_the_best_reference():
    # vs 'the dog': LCS 1, P = 1/3, R = 1/2 -> F = 2/5 ; vs 'the cat was here': F = 4/7 (best)
    assert rouge_l(["the cat sat"], [["the dog", "the cat was here"]]) == pytest.approx(100 * 4 / 7)


def test_rouge_l_stemming():
    # With stemming 'cats' matches 'cat' (F = 1); without, only 'the' matches: P = R = 1/2.
    assert rouge_l(["the cats"], ["the cat"]) == pytest.approx(100.0)
    assert rouge_l(["the cats"], ["the cat"], use_stemmer=False) == pytest.approx(50.0)
