"""Text-overlap metrics of generated reports: corpus BLEU-4 and ROUGE-L F1.

Both metrics see the same tokens (:func:`metric_tokens`): lower-cased words and numbers,
each punctuation mark its own token, so "8 mm." and "8 mm ." compare equal and the wording of
a report, not its capitalisation, is scored.

* BLEU-4 (Papineni et al. 2002) is corpus-level: clipped n-gram matches and totals are summed
  over all reports before the modified precisions, their geometric mean and the brevity
  penalty are taken; no smoothing, so a corpus without any matching 4-gram scores 0.
  Computed by ``sacrebleu`` and reported on a 0-1 scale.
* ROUGE-L F1 (Lin 2004) is per report (longest common subsequence of the token sequences),
  averaged over reports. Computed by ``rouge-score``.

For patient-bootstrap intervals the per-report statistics are computed once
(:func:`bleu_statistics`, :func:`rouge_l_scores`) and every resample only sums or averages
rows: corpus BLEU of a resample is :func:`bleu_from_statistics` of its rows' sum, exactly what
sacrebleu computes on the resampled corpus (single reference per report).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

MAX_NGRAM_ORDER = 4
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]|_")


def metric_tokens(text: str) -> list[str]:
    """Lower-cased word / number tokens with each punctuation mark a token of its own."""
    return _TOKEN.findall(str(text).lower())


def _joined(text: str) -> str:
    return " ".join(metric_tokens(text))


def _bleu():
    from sacrebleu.metrics import BLEU

    # tokenize="none": the text is already split by metric_tokens (shared with ROUGE-L).
    return BLEU(tokenize="none", smooth_method="none", max_ngram_order=MAX_NGRAM_ORDER)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1] of ``hypotheses`` against one reference each."""
    _check_pairs(hypotheses, references)
    score = _bleu().corpus_score(
        [_joined(h) for h in hypotheses], [[_joined(r) for r in references]]
    )
    return float(score.score) / 100.0


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(n, 2 + 2 * 4) per-report BLEU sufficient statistics.

    Columns: hypothesis length, reference length, clipped n-gram matches for n = 1..4, then
    the hypothesis n-gram totals for n = 1..4. Rows add up to the corpus statistics.
    """
    _check_pairs(hypotheses, references)
    bleu = _bleu()
    rows = []
    for hypothesis, reference in zip(hypotheses, references):
        score = bleu.corpus_score([_joined(hypothesis)], [[_joined(reference)]])
        rows.append([score.sys_len, score.ref_len, *score.counts, *score.totals])
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 2 + 2 * MAX_NGRAM_ORDER)


def bleu_from_statistics(statistics: np.ndarray) -> float:
    """Corpus BLEU-4 in [0, 1] from summed (or stacked, then summed) per-report statistics."""
    from sacrebleu.metrics import BLEU

    total = np.asarray(statistics, dtype=np.int64)
    if total.ndim == 2:
        total = total.sum(axis=0)
    if total[1] == 0:
        return float("nan")  # no reference tokens: BLEU is undefined
    n = MAX_NGRAM_ORDER
    score = BLEU.compute_bleu(
        correct=[int(c) for c in total[2 : 2 + n]],
        total=[int(t) for t in total[2 + n : 2 + 2 * n]],
        sys_len=int(total[0]),
        ref_len=int(total[1]),
        smooth_method="none",
        max_ngram_order=n,
    )
    return float(score.score) / 100.0


class _MetricTokenizer:
    """rouge-score tokenizer interface over :func:`metric_tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return metric_tokens(text)


def rouge_l_scores(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(n,) ROUGE-L F1 of each hypothesis against its reference (0 when either is empty)."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_pairs(hypotheses, references)
    scorer = RougeScorer(["rougeL"], tokenizer=_MetricTokenizer())
    return np.array(
        [scorer.score(str(r), str(h))["rougeL"].fmeasure for h, r in zip(hypotheses, references)],
        dtype=np.float64,
    )


def mean_rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L F1 averaged over reports."""
    scores = rouge_l_scores(hypotheses, references)
    return float(scores.mean()) if len(scores) else float("nan")


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; need one each"
        )
