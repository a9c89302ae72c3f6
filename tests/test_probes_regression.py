"""Regression metrics against numpy formulas, and the ridge probe."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from voxelfm.errors import VoxelFMError
from voxelfm.probes.regression import (
    fit_select_ridge,
    mean_absolute_error_metric,
    pearson_r,
    r_squared,
)

Y_TRUE = np.array([3.0, -0.5, 2.0, 7.0, 4.2])
PREDICTIONS = np.array([2.5, 0.0, 2.0, 8.0, 3.9])


def test_metrics_match_their_textbook_formulas():
    assert mean_absolute_error_metric(Y_TRUE, PREDICTIONS) == pytest.approx(
        np.mean(np.abs(Y_TRUE - PREDICTIONS))
    )
    residual = np.sum((Y_TRUE - PREDICTIONS) ** 2)
    total = np.sum((Y_TRUE - Y_TRUE.mean()) ** 2)
    assert r_squared(Y_TRUE, PREDICTIONS) == pytest.approx(1 - residual / total)
    centred_t, centred_p = Y_TRUE - Y_TRUE.mean(), PREDICTIONS - PREDICTIONS.mean()
    assert pearson_r(Y_TRUE, PREDICTIONS) == pytest.approx(
        centred_t @ centred_p / np.sqrt((centred_t @ centred_t) * (centred_p @ centred_p))
    )


def test_metrics_are_nan_where_undefined():
    constant = np.ones(4)
    assert np.isnan(r_squared(constant, np.arange(4.0)))
    assert np.isnan(pearson_r(np.arange(4.0), constant))


def _linear_problem(n=200, d=20, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = 3 * X[:, 0] - 2 * X[:, 1] + rng.normal(size=n)
    return X[:100], y[:100], X[100:150], y[100:150], X[150:], y[150:]


def test_ridge_choice_is_the_best_validation_r2_of_an_independent_grid_search():
    X_tr, y_tr, X_va, y_va, X_te, y_te = _linear_problem()
    grid = (1000.0, 10.0, 0.1)
    probe = fit_select_ridge(X_tr, y_tr, X_va, y_va, alpha_grid=grid)
    val_r2 = [
        r2_score(
            y_va, make_pipeline(StandardScaler(), Ridge(alpha=a)).fit(X_tr, y_tr).predict(X_va)
        )
        for a in grid
    ]
    assert probe.hyperparameters == {"alpha": grid[int(np.argmax(val_r2))]}
    assert r_squared(y_te, probe.predict(X_te)) > 0.8


def test_ridge_rejects_non_finite_targets():
    X_tr, y_tr, X_va, y_va, *_ = _linear_problem()
    y_tr = y_tr.copy()
    y_tr[0] = np.nan
    with pytest.raises(VoxelFMError, match="train regression targets"):
        fit_select_ridge(X_tr, y_tr, X_va, y_va)
