"""The fitted-probe contract and validation-only hyper-parameter selection.

Protocol (as in the reference implementation, rmaguado/VoxelFM ``dinov2/evaluation``): each
candidate is fitted on the training split, scored on the validation split, and the best
candidate *as fitted on train* is the final model. There is no refit on train+val: the
network probes choose their epoch by early stopping on validation, which has no equivalent on
a merged set, and keeping one rule for all probes keeps their comparison fair. The test split
is seen once, by ``registry.evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from voxelfm.errors import VoxelFMError

Task = Literal["classification", "regression", "survival"]

# scores = predict(X): (n, ...) inputs -> (n,) or (n, k) scores, see the package docstring.
Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FittedProbe:
    """A probe fitted on train, with hyper-parameters chosen on validation.

    Attributes:
        task: which target convention the probe follows.
        name: probe name, e.g. "logistic".
        hyperparameters: the chosen values (for network probes including the best epoch).
        validation_score: the selection criterion at the chosen values (higher is better).
        predict: picklable callable mapping inputs to scores.
        decision_threshold: threshold on validation scores turning probabilities into labels
            (classification only; a float for binary, (L,) for multi-label, None otherwise).
        selection_trace: every candidate tried, with its validation score, for the report.
    """

    task: Task
    name: str
    hyperparameters: Mapping[str, Any]
    validation_score: float
    predict: Predictor
    decision_threshold: float | np.ndarray | None = None
    selection_trace: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Selection:
    """The winner of a validation grid search."""

    hyperparameters: dict[str, Any]
    predictor: Predictor
    validation_score: float
    trace: tuple[dict[str, Any], ...]


def select_on_validation(
    candidates: Iterable[dict[str, Any]],
    fit: Callable[[dict[str, Any]], Predictor | None],
    validation_score: Callable[[Predictor], float],
) -> Selection:
    """Fit every candidate on train and keep the one with the best validation score.

    Ties keep the earlier candidate, so grids are listed from the most to the least
    regularised and a tie goes to the simpler model. Candidates that cannot be fitted or whose
    score is not finite are recorded in the trace (score nan) and never chosen.

    Args:
        candidates: hyper-parameter dictionaries, in order of preference.
        fit: fits one candidate on the training split and returns its predictor, or None when
            the candidate cannot be fitted (e.g. a Cox model that does not converge).
        validation_score: scores a predictor on the validation split (higher is better).
    """
    best_params, best_predictor, best_score = None, None, -np.inf
    trace = []
    for params in candidates:
        predictor = fit(params)
        score = float("nan") if predictor is None else float(validation_score(predictor))
        trace.append({**params, "validation_score": score})
        if score > best_score:  # False for nan
            best_params, best_predictor, best_score = dict(params), predictor, score
    if best_params is None:
        raise VoxelFMError(f"no hyper-parameter candidate gave a finite validation score: {trace}")
    return Selection(best_params, best_predictor, best_score, tuple(trace))


def as_probe_inputs(X, y, split_name: str, feature_ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Check one split's arrays and return them as float32 features and numpy targets.

    Args:
        X: (n, d) features, or (n, N, d) patch tokens when ``feature_ndim`` is 3.
        y: (n,) or (n, k) targets.
        split_name: used in error messages ("train", "val", "test").
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != feature_ndim:
        raise VoxelFMError(
            f"{split_name} features must have {feature_ndim} dims, got shape {X.shape}"
        )
    if len(X) != len(y):
        raise VoxelFMError(f"{split_name} has {len(X)} feature rows but {len(y)} targets")
    if len(X) == 0:
        raise VoxelFMError(f"{split_name} split is empty")
    if not np.isfinite(X).all():
        raise VoxelFMError(f"{split_name} features contain NaN or infinite values")
    return X, y
