"""Classification probes on frozen features: logistic regression and cosine kNN, plus metrics.

Binary is the main case; multi-class (y (n,) in 0..C-1) and multi-label (y (n, L) 0/1) are
supported with macro averaging over one-vs-rest columns. The attentive-pooling probe over
patch tokens lives in ``attentive.py`` (it needs torch).

Metrics (all take ``(y_true, scores)``; ``nan`` where undefined, e.g. a single class):
AUROC and AUPRC (average precision), macro over one-vs-rest columns that have both classes;
balanced accuracy at the Youden threshold chosen on validation (argmax for multi-class).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_curve
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from voxelfm.errors import VoxelFMError
from voxelfm.probes.fitted import FittedProbe, as_probe_inputs, select_on_validation

LabelKind = Literal["binary", "multiclass", "multilabel"]
MetricFn = Callable[[np.ndarray, np.ndarray], float]

# Inverse regularisation strengths, strongest first so validation ties pick the simpler model.
DEFAULT_C_GRID: tuple[float, ...] = tuple(np.logspace(-4, 2, 7))
# The reference implementation's kNN grid, largest (smoothest) first for the same reason.
DEFAULT_K_GRID: tuple[int, ...] = (101, 75, 51, 31, 21, 15, 11, 9, 7, 5, 3, 1)


def label_kind(y: np.ndarray) -> LabelKind:
    """Which classification setting ``y`` describes; raises if it fits none.

    Args:
        y: (n,) integer classes 0..C-1, or (n, L) 0/1 indicators.
    """
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.number) or not np.array_equal(y, np.round(y)):
        raise VoxelFMError("classification labels must be integers (0..C-1) or 0/1 indicators")
    if y.ndim == 2:
        if not np.isin(y, (0, 1)).all():
            raise VoxelFMError("multi-label targets must be 0/1")
        return "multilabel"
    if y.ndim != 1 or y.min() < 0:
        raise VoxelFMError("class labels must be a 1-D array of integers 0..C-1")
    return "binary" if y.max() <= 1 else "multiclass"


def one_vs_rest_columns(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as (n, K) one-vs-rest columns: K = 1 (binary), C classes, or L labels."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    if scores.ndim == 1:
        return y_true.reshape(-1, 1).astype(int), scores.reshape(-1, 1)
    if y_true.ndim == 1:  # multi-class: compare each class against the rest
        return (y_true[:, None] == np.arange(scores.shape[1])).astype(int), scores
    return y_true.astype(int), scores


def _macro_over_defined_columns(metric: MetricFn, y_true, scores) -> float:
    """Mean of ``metric`` over columns that contain both classes; nan if none does."""
    columns, column_scores = one_vs_rest_columns(y_true, scores)
    values = [
        metric(columns[:, k], column_scores[:, k])
        for k in range(columns.shape[1])
        if 0 < columns[:, k].sum() < len(columns)
    ]
    return float(np.mean(values)) if values else float("nan")


# The bootstrap calls these metrics thousands of times per probe; sklearn's input validation
# costs ~100x the arithmetic at test-set sizes, so each column is scored with numpy. The tests
# check both against roc_auc_score / average_precision_score, ties included.


def _column_auroc(truth: np.ndarray, column_scores: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg) with mid-ranks for ties (= sklearn's roc_auc_score)."""
    positive = truth.astype(bool)
    n_positive = positive.sum()
    n_negative = len(positive) - n_positive
    ranks = rankdata(column_scores)
    return float(
        (ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
    )


def _column_average_precision(truth: np.ndarray, column_scores: np.ndarray) -> float:
    """Sum over distinct thresholds of (recall step) x precision (= average_precision_score)."""
    order = np.argsort(-column_scores, kind="mergesort")
    sorted_scores, sorted_truth = column_scores[order], truth[order].astype(np.float64)
    threshold_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = np.cumsum(sorted_truth)[threshold_ends]
    precision = true_positives / (threshold_ends + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (macro one-vs-rest for multi-class / multi-label)."""
    return _macro_over_defined_columns(_column_auroc, y_true, scores)


def auprc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, the step-wise area under the precision-recall curve (macro)."""
    return _macro_over_defined_columns(_column_average_precision, y_true, scores)


def balanced_accuracy(
    y_true: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray | None
) -> float:
    """Balanced accuracy (mean per-class recall) of thresholded scores.

    Binary / multi-label: a score >= threshold (per label) is a positive prediction, and the
    multi-label value is the mean over labels with both classes. Multi-class: argmax.
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    if scores.ndim == 2 and y_true.ndim == 1:
        if len(np.unique(y_true)) < 2:
            return float("nan")
        return float(balanced_accuracy_score(y_true, scores.argmax(axis=1)))
    columns, column_scores = one_vs_rest_columns(y_true, scores)
    predicted = column_scores >= np.broadcast_to(threshold, columns.shape[1])
    return _macro_over_defined_columns(_column_balanced_accuracy, columns, predicted.astype(int))


def _column_balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean of sensitivity and specificity of 0/1 predictions (= balanced_accuracy_score)."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    sensitivity = (predicted & truth).sum() / truth.sum()
    specificity = (~predicted & ~truth).sum() / (~truth).sum()
    return float((sensitivity + specificity) / 2)


def youden_threshold(y_val: np.ndarray, scores_val: np.ndarray) -> float | np.ndarray | None:
    """Per-column threshold maximising sensitivity + specificity - 1 on validation.

    Youden's J rather than 0.5 because a probe's probabilities are not calibrated to the test
    prevalence. Columns without both classes fall back to 0.5. Multi-class returns None
    (argmax needs no threshold).
    """
    y_val, scores_val = np.asarray(y_val), np.asarray(scores_val)
    if scores_val.ndim == 2 and y_val.ndim == 1:
        return None
    columns, column_scores = one_vs_rest_columns(y_val, scores_val)
    thresholds = np.full(columns.shape[1], 0.5)
    for k in range(columns.shape[1]):
        if 0 < columns[:, k].sum() < len(columns):
            fpr, tpr, cut = roc_curve(columns[:, k], column_scores[:, k])
            thresholds[k] = cut[np.argmax(tpr - fpr)]
    return float(thresholds[0]) if scores_val.ndim == 1 else thresholds


def metric_functions(decision_threshold: float | np.ndarray | None) -> dict[str, MetricFn]:
    """The classification metrics as ``(y_true, scores) -> float``, ready for bootstrapping."""
    return {
        "auroc": auroc,
        "auprc": auprc,
        "balanced_accuracy": functools.partial(balanced_accuracy, threshold=decision_threshold),
    }


class ProbabilityPredictor:
    """A fitted scikit-learn classifier returning scores in the package convention.

    binary -> P(class 1) (n,); multi-class -> (n, C); multi-label -> P(label) (n, L).
    """

    def __init__(self, model, kind: LabelKind):
        self.model = model
        self.kind = kind

    def __call__(self, X: np.ndarray) -> np.ndarray:
        proba = self.model.predict_proba(X)
        if self.kind == "binary":
            return proba[:, 1]
        if isinstance(proba, list):  # multi-output kNN: one (n, n_classes_seen) array per label
            return np.column_stack(
                [
                    p[:, list(classes).index(1)] if 1 in classes else np.zeros(len(p))
                    for p, classes in zip(proba, self.model.classes_)
                ]
            )
        return proba


def check_training_labels(y_train: np.ndarray) -> LabelKind:
    """The label kind, after checking that training contains every class 0..C-1 (C >= 2)."""
    kind = label_kind(y_train)
    if kind == "multilabel":
        return kind
    n_classes = max(2, int(y_train.max()) + 1)
    missing = np.setdiff1d(np.arange(n_classes), y_train)
    if len(missing):
        raise VoxelFMError(
            f"training labels must contain every class 0..{n_classes - 1}; "
            f"missing {missing.tolist()}"
        )
    return kind


def _fit_select_sklearn(
    name: str,
    make_model: Callable[[dict], object],
    candidates: Sequence[dict],
    X_train,
    y_train,
    X_val,
    y_val,
) -> FittedProbe:
    """Grid search on validation AUROC for any scikit-learn classifier factory."""
    X_train, y_train = as_probe_inputs(X_train, y_train, "train")
    X_val, y_val = as_probe_inputs(X_val, y_val, "val")
    kind = check_training_labels(y_train)

    def fit(params: dict) -> ProbabilityPredictor:
        return ProbabilityPredictor(make_model(params).fit(X_train, y_train), kind)

    selection = select_on_validation(
        candidates, fit, lambda predictor: auroc(y_val, predictor(X_val))
    )
    return FittedProbe(
        task="classification",
        name=name,
        hyperparameters=selection.hyperparameters,
        validation_score=selection.validation_score,
        predict=selection.predictor,
        decision_threshold=youden_threshold(y_val, selection.predictor(X_val)),
        selection_trace=selection.trace,
    )


def fit_select_logistic(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    seed: int = 0,
) -> FittedProbe:
    """L2 logistic regression on standardised features, C chosen on validation AUROC.

    Args:
        X_train, X_val: (n, d) features. y_train, y_val: labels (see module docstring).
        c_grid: inverse regularisation strengths, strongest first.
        seed: accepted for a uniform probe interface; lbfgs is deterministic.
    """

    def make_model(params: dict):
        logistic = LogisticRegression(C=params["C"], max_iter=5000, random_state=seed)
        if label_kind(y_train) == "multilabel":
            logistic = OneVsRestClassifier(logistic)
        return make_pipeline(StandardScaler(), logistic)

    candidates = [{"C": float(c)} for c in c_grid]
    return _fit_select_sklearn("logistic", make_model, candidates, X_train, y_train, X_val, y_val)


def fit_select_knn(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    k_grid: Sequence[int] = DEFAULT_K_GRID,
    seed: int = 0,
) -> FittedProbe:
    """Cosine k-nearest-neighbour vote weighted by inverse distance, k chosen on validation AUROC.

    Cosine because self-supervised ViT embeddings are compared by angle in training (DINO
    heads normalise), so the norm carries little label information; distance weighting
    follows the reference implementation. k values above the training size are skipped;
    ``seed`` is accepted for a uniform probe interface (kNN is deterministic).
    """
    n_train = len(X_train)
    candidates = [{"k": int(k)} for k in k_grid if k <= n_train]
    if not candidates:
        raise VoxelFMError(f"no k in {list(k_grid)} fits {n_train} training rows")

    def make_model(params: dict):
        return KNeighborsClassifier(
            n_neighbors=params["k"], metric="cosine", algorithm="brute", weights="distance"
        )

    return _fit_select_sklearn("knn", make_model, candidates, X_train, y_train, X_val, y_val)
