"""BLEU-4 and ROUGE-L against hand-computed values and an independent LCS."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxelfm.stats.text_metrics import (
    bleu_from_statistics,
    bleu_statistics,
    corpus_bleu,
    mean_rouge_l,
    metric_tokens,
    rouge_l_scores,
)


def test_tokens_lowercase_and_split_punctuation():
    assert metric_tokens("FINDINGS: A 21 mm nodule, RUL.") == [
        "findings", ":", "a", "21", "mm", "nodule", ",", "rul", ".",
    ]  # fmt: skip
    assert metric_tokens("Low-attenuation") == ["low", "-", "attenuation"]


def test_bleu_single_sentence_by_hand():
    # Clipped matches 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty.
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        expected, abs=1e-9
    )


def test_bleu_brevity_penalty_by_hand():
    # Every n-gram of the short hypothesis matches; BP = exp(1 - 6 / 4).
    score = corpus_bleu(["the cat sat on"], ["the cat sat on the mat"])
    assert score == pytest.approx(math.exp(1 - 6 / 4), abs=1e-9)


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
    hypotheses = ["a b c d e", "x y z w"]
    references = ["a b c d e", "p q r s"]
    # Pooled precisions 5/9, 4/7, 3/5, 2/3; the sentence mean would be (1 + 0) / 2.
    expected = (5 / 9 * 4 / 7 * 3 / 5 * 2 / 3) ** 0.25
    assert corpus_bleu(hypotheses, references) == pytest.approx(expected, abs=1e-9)


def test_bleu_ignores_case_and_punctuation_spacing():
    assert corpus_bleu(["The lungs are clear."], ["the lungs are clear ."]) == pytest.approx(1.0)
    assert corpus_bleu(["kidneys normal"], ["the lungs are clear"]) == 0.0


def test_bleu_statistics_add_up_to_the_corpus_score():
    rng = np.random.default_rng(0)
    words = ["the", "liver", "lung", "nodule", "lesion", "mm", "segment", "clear", "is", "a", "in"]
    hypotheses = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(12)]
    references = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(12)]
    stats = bleu_statistics(hypotheses, references)
    assert stats.shape == (12, 10)
    assert bleu_from_statistics(stats) == pytest.approx(corpus_bleu(hypotheses, references))
    rows = rng.integers(0, 12, 12)  # a bootstrap resample, repeats included
    resampled = corpus_bleu([hypotheses[i] for i in rows], [references[i] for i in rows])
    assert bleu_from_statistics(stats[rows]) == pytest.approx(resampled)


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 tokens: P = 5/6, R = 5/5, F = 10/11.
    scores = rouge_l_scores(
        ["the cat sat on the mat", "a b c d"], ["the cat on the mat", "d c b a"]
    )
    np.testing.assert_allclose(scores, [10 / 11, 0.25])
    assert mean_rouge_l(["x"], ["y"]) == 0.0


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def test_rouge_l_matches_an_independent_lcs():
    rng = np.random.default_rng(1)
    words = list("abcdef")
    hypotheses = [" ".join(rng.choice(words, rng.integers(1, 10))) for _ in range(20)]
    references = [" ".join(rng.choice(words, rng.integers(1, 10))) for _ in range(20)]
    expected = []
    for h, r in zip(hypotheses, references):
        lcs = _lcs(h.split(), r.split())
        p, q = lcs / len(h.split()), lcs / len(r.split())
        expected.append(0.0 if lcs == 0 else 2 * p * q / (p + q))
    np.testing.assert_allclose(rouge_l_scores(hypotheses, references), expected)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="one each"):
        corpus_bleu(["a"], ["a", "b"])
