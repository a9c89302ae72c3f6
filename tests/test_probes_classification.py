"""Classification metrics against hand computations, and the logistic / kNN probes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from voxelfm.errors import VoxelFMError
from voxelfm.probes import classification
from voxelfm.probes.classification import (
    auprc,
    auroc,
    balanced_accuracy,
    fit_select_knn,
    fit_select_logistic,
    youden_threshold,
)
from voxelfm.probes.registry import evaluate


def _binary_problem(n: int = 240, d: int = 16, seed: int = 0):
    """Features where the label depends on the first feature; split 50/25/25."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X[:, 0] + 0.7 * rng.normal(size=n) > 0).astype(int)
    cut = [n // 2, 3 * n // 4]
    return [(X[a:b], y[a:b]) for a, b in ((0, cut[0]), (cut[0], cut[1]), (cut[1], n))]


def _pairwise_auroc(y, s):
    """P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = s[y == 1], s[y == 0]
    return ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()


def test_auroc_matches_pair_counting_including_ties():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.2, 0.9])
    assert auroc(y, s) == pytest.approx(_pairwise_auroc(y, s))
    assert np.isnan(auroc(np.ones(4), np.arange(4.0)))  # one class: undefined, not 0.5


def test_auprc_matches_precision_at_each_positive():
    y = np.array([1, 0, 1, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])  # ranks of positives: 1, 3, 6
    assert auprc(y, s) == pytest.approx(np.mean([1 / 1, 2 / 3, 3 / 6]))
    assert np.isnan(auprc(np.zeros(3), np.arange(3.0)))


def test_balanced_accuracy_is_mean_of_sensitivity_and_specificity():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4])
    # threshold 0.5: TP 2/3, TN 3/4
    assert balanced_accuracy(y, s, 0.5) == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = y * 0.8 + rng.normal(size=60)
    threshold = youden_threshold(y, s)
    j = lambda t: (
        ((s >= t) & (y == 1)).sum() / y.sum() - ((s >= t) & (y == 0)).sum() / (y == 0).sum()
    )
    assert j(threshold) == pytest.approx(max(j(t) for t in s))


def test_multiclass_and_multilabel_metrics_are_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    proba = rng.dirichlet(np.ones(3), size=30)
    assert auroc(y, proba) == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))
    labels = rng.integers(0, 2, (30, 2))
    scores = rng.random((30, 2))
    expected = np.mean([_pairwise_auroc(labels[:, k], scores[:, k]) for k in range(2)])
    assert auroc(labels, scores) == pytest.approx(expected)
    labels[:, 1] = 0  # an all-negative label column is left out, not counted as 0
    assert auroc(labels, scores) == pytest.approx(_pairwise_auroc(labels[:, 0], scores[:, 0]))


@pytest.mark.parametrize("fit_select", [fit_select_logistic, fit_select_knn])
def test_probe_learns_a_linear_signal_and_reports_its_choice(fit_select):
    (X_tr, y_tr), (X_va, y_va), (X_te, y_te) = _binary_problem()
    probe = fit_select(X_tr, y_tr, X_va, y_va)
    metrics = evaluate(probe, X_te, y_te)
    assert metrics["auroc"] > 0.75
    assert set(metrics) == {"auroc", "auprc", "balanced_accuracy"}
    # The chosen candidate is the best validation candidate of the trace.
    best = max(probe.selection_trace, key=lambda c: c["validation_score"])
    assert probe.validation_score == best["validation_score"]
    assert probe.validation_score == pytest.approx(auroc(y_va, probe.predict(X_va)))
    assert probe.decision_threshold == pytest.approx(youden_threshold(y_va, probe.predict(X_va)))
    pickle.loads(pickle.dumps(probe))  # pipelines may ship fitted probes between jobs


def test_logistic_choice_is_the_best_validation_auroc_of_an_independent_grid_search():
    (X_tr, y_tr), (X_va, y_va), _ = _binary_problem()
    grid = (1e-4, 1e-2, 1.0)
    y_va_shuffled = np.random.default_rng(5).permutation(y_va)  # make the choice non-trivial
    probe = fit_select_logistic(X_tr, y_tr, X_va, y_va_shuffled, c_grid=grid)
    validation_auroc = [
        roc_auc_score(
            y_va_shuffled,
            make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
            .fit(X_tr, y_tr)
            .predict_proba(X_va)[:, 1],
        )
        for c in grid
    ]
    assert probe.hyperparameters == {"C": grid[int(np.argmax(validation_auroc))]}
    assert [c["validation_score"] for c in probe.selection_trace] == pytest.approx(validation_auroc)


def test_multiclass_and_multilabel_probes_run():
    (X_tr, _), (X_va, _), (X_te, _) = _binary_problem()
    to_three_classes = lambda X: np.digitize(X[:, 0], [-0.5, 0.5])
    probe = fit_select_logistic(X_tr, to_three_classes(X_tr), X_va, to_three_classes(X_va))
    assert probe.predict(X_te).shape == (len(X_te), 3) and probe.decision_threshold is None
    assert evaluate(probe, X_te, to_three_classes(X_te))["auroc"] > 0.8
    two_labels = lambda X: np.stack([X[:, 0] > 0, X[:, 1] > 0], axis=1).astype(int)
    probe = fit_select_knn(X_tr, two_labels(X_tr), X_va, two_labels(X_va))
    assert probe.predict(X_te).shape == (len(X_te), 2) and probe.decision_threshold.shape == (2,)
    assert 0.5 < evaluate(probe, X_te, two_labels(X_te))["balanced_accuracy"] <= 1


def test_bad_labels_are_reported():
    X = np.zeros((4, 2))
    with pytest.raises(VoxelFMError, match="every class"):
        fit_select_logistic(X, np.array([0, 0, 2, 2]), X, np.array([0, 1, 2, 0]))
    with pytest.raises(VoxelFMError, match="integers"):
        classification.label_kind(np.array([0.5, 1.0]))
    with pytest.raises(VoxelFMError, match="feature rows"):
        fit_select_logistic(X, np.array([0, 1, 0]), X, np.array([0, 1, 0, 1]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tied", [False, True])
def test_numpy_metrics_equal_sklearn(seed, tied):
    """The bootstrap's fast AUROC / AUPRC / balanced accuracy against scikit-learn."""
    from sklearn.metrics import average_precision_score, balanced_accuracy_score

    from voxelfm.probes.classification import auprc, balanced_accuracy

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 37)
    y[:2] = (0, 1)
    scores = rng.random(37)
    if tied:
        scores = np.round(scores * 4) / 4  # few distinct values: many ties
    assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert auprc(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    assert balanced_accuracy(y, scores, 0.5) == pytest.approx(
        balanced_accuracy_score(y, scores >= 0.5), abs=1e-12
    )
    labels = rng.integers(0, 2, (37, 3))
    label_scores = rng.random((37, 3))
    assert auroc(labels, label_scores) == pytest.approx(
        roc_auc_score(labels, label_scores, average="macro"), abs=1e-12
    )
