"""Regression probe (ridge) and metrics; the MLP regressor lives in ``mlp_regression.py``.

Metrics take ``(y_true, predictions)`` and return ``nan`` where undefined (constant targets
or predictions), so bootstrap resamples where they are undefined can be counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from voxelfm.errors import VoxelFMError
from voxelfm.probes.fitted import FittedProbe, as_probe_inputs, select_on_validation

MetricFn = Callable[[np.ndarray, np.ndarray], float]

# Strongest regularisation first so validation ties pick the simpler model.
DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(np.logspace(4, -2, 7))


def mean_absolute_error_metric(y_true: np.ndarray, predictions: np.ndarray) -> float:
    """Mean absolute error, in the units of the target."""
    return float(mean_absolute_error(y_true, predictions))


def r_squared(y_true: np.ndarray, predictions: np.ndarray) -> float:
    """Coefficient of determination; nan for constant targets (sklearn would return 0)."""
    if np.ptp(y_true) == 0:
        return float("nan")
    return float(r2_score(y_true, predictions))


def pearson_r(y_true: np.ndarray, predictions: np.ndarray) -> float:
    """Pearson correlation; nan when either side is constant."""
    if np.ptp(y_true) == 0 or np.ptp(predictions) == 0:
        return float("nan")
    return float(pearsonr(y_true, predictions).statistic)


def metric_functions() -> dict[str, MetricFn]:
    """The regression metrics as ``(y_true, predictions) -> float``."""
    return {"mae": mean_absolute_error_metric, "r2": r_squared, "pearson_r": pearson_r}


def as_regression_targets(y, split_name: str) -> np.ndarray:
    """(n,) float targets."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or not np.isfinite(y).all():
        raise VoxelFMError(f"{split_name} regression targets must be a finite 1-D array")
    return y


def fit_select_ridge(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    seed: int = 0,
) -> FittedProbe:
    """Ridge regression on standardised features, alpha chosen on validation R^2.

    R^2 ranks candidates exactly as validation mean squared error does (the loss ridge
    minimises). ``seed`` is accepted for a uniform probe interface; ridge is deterministic.
    """
    X_train, y_train = as_probe_inputs(X_train, as_regression_targets(y_train, "train"), "train")
    X_val, y_val = as_probe_inputs(X_val, as_regression_targets(y_val, "val"), "val")

    def fit(params: dict):
        return (
            make_pipeline(StandardScaler(), Ridge(alpha=params["alpha"]))
            .fit(X_train, y_train)
            .predict
        )

    selection = select_on_validation(
        [{"alpha": float(a)} for a in alpha_grid],
        fit,
        lambda predict: r_squared(y_val, predict(X_val)),
    )
    return FittedProbe(
        task="regression",
        name="ridge",
        hyperparameters=selection.hyperparameters,
        validation_score=selection.validation_score,
        predict=selection.predictor,
        selection_trace=selection.trace,
    )
