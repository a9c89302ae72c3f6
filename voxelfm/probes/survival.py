"""Survival probe (penalised Cox on principal components), C-index and Kaplan-Meier risk groups.

Targets are (n, 2) arrays of (time, event); scores are risks, higher = shorter survival. The
MLP Cox head lives in ``cox_mlp.py`` (it needs torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.exceptions import ConvergenceError
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from voxelfm.errors import VoxelFMError
from voxelfm.probes.fitted import FittedProbe, as_probe_inputs, select_on_validation

MetricFn = Callable[[np.ndarray, np.ndarray], float]

# Fewest components first and strongest penalty first: validation ties pick the simpler model.
DEFAULT_N_COMPONENTS_GRID: tuple[int, ...] = (2, 4, 8, 16, 32)
DEFAULT_PENALIZER_GRID: tuple[float, ...] = (10.0, 1.0, 0.1, 0.01)
# Penalisation tolerates fewer than the classical 10 events per variable; 5 keeps the
# partial likelihood from being fitted to a handful of events.
MIN_EVENTS_PER_COMPONENT = 5


def as_survival_targets(y, split_name: str) -> np.ndarray:
    """(n, 2) float array of (time > 0, event in {0, 1})."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != 2:
        raise VoxelFMError(f"{split_name} survival targets must have shape (n, 2) = (time, event)")
    time, event = y[:, 0], y[:, 1]
    if not (np.isfinite(time).all() and (time > 0).all()):
        raise VoxelFMError(f"{split_name} survival times must be finite and positive")
    if not np.isin(event, (0, 1)).all():
        raise VoxelFMError(f"{split_name} event indicators must be 0 (censored) or 1 (observed)")
    return y


def harrell_c_index(y: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index of risks (higher risk = earlier event); nan if undefined.

    lifelines scores concordance of *survival* predictions, so the risk is negated.
    """
    y = np.asarray(y, dtype=np.float64)
    try:
        return float(concordance_index(y[:, 0], -np.asarray(risk), y[:, 1]))
    except ZeroDivisionError:  # no comparable pair, e.g. every patient censored
        return float("nan")


def metric_functions() -> dict[str, MetricFn]:
    """The survival metrics as ``(y, risk) -> float``."""
    return {"c_index": harrell_c_index}


class CoxRiskPredictor:
    """Standardise -> project on the first principal components -> Cox log partial hazard."""

    def __init__(self, reducer: Pipeline, n_components: int, cox: CoxPHFitter):
        self.reducer = reducer
        self.n_components = n_components
        self.cox = cox

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return self.cox.predict_log_partial_hazard(
            _components_frame(self.reducer.transform(X)[:, : self.n_components])
        ).to_numpy()


def _components_frame(components: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(components, columns=[f"pc{i}" for i in range(components.shape[1])])


def max_components(n_train: int, n_features: int, n_events: int) -> int:
    """Largest PCA size the training split supports (at least 1)."""
    return max(1, min(n_features, n_train - 1, n_events // MIN_EVENTS_PER_COMPONENT))


def fit_select_cox(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_components_grid: Sequence[int] = DEFAULT_N_COMPONENTS_GRID,
    penalizer_grid: Sequence[float] = DEFAULT_PENALIZER_GRID,
    seed: int = 0,
) -> FittedProbe:
    """Ridge-penalised Cox model on standardised, PCA-reduced features.

    The number of components and the penalizer are chosen on validation C-index; component
    counts above ``max_components`` (about ``MIN_EVENTS_PER_COMPONENT`` training events per
    component) are dropped, keeping the cap itself if the whole grid is above it.
    """
    X_train, y_train = as_probe_inputs(X_train, as_survival_targets(y_train, "train"), "train")
    X_val, y_val = as_probe_inputs(X_val, as_survival_targets(y_val, "val"), "val")
    cap = max_components(len(X_train), X_train.shape[1], int(y_train[:, 1].sum()))
    component_counts = sorted({min(int(n), cap) for n in n_components_grid})
    # Components are nested under a full SVD, so one PCA at the largest size serves every count.
    reducer = make_pipeline(
        StandardScaler(),
        PCA(n_components=component_counts[-1], svd_solver="full", random_state=seed),
    ).fit(X_train)
    train_components = reducer.transform(X_train)

    def fit(params: dict) -> CoxRiskPredictor | None:
        n = params["n_components"]
        frame = _components_frame(train_components[:, :n])
        frame["time"], frame["event"] = y_train[:, 0], y_train[:, 1]
        try:
            cox = CoxPHFitter(penalizer=params["penalizer"]).fit(frame, "time", "event")
        except ConvergenceError:
            return None
        return CoxRiskPredictor(reducer, n, cox)

    candidates = [
        {"n_components": n, "penalizer": float(p)} for n in component_counts for p in penalizer_grid
    ]
    selection = select_on_validation(
        candidates, fit, lambda predict: harrell_c_index(y_val, predict(X_val))
    )
    return FittedProbe(
        task="survival",
        name="cox",
        hyperparameters=selection.hyperparameters,
        validation_score=selection.validation_score,
        predict=selection.predictor,
        selection_trace=selection.trace,
    )


@dataclass(frozen=True)
class RiskGroupCurves:
    """Kaplan-Meier curves of test patients split at the median training risk.

    Attributes:
        threshold: median risk of the training patients; test risk above it = "high risk".
        curves: group name -> DataFrame(time, survival, lower, upper) with the 95% CI.
        group_sizes: group name -> number of test rows.
        logrank_statistic, logrank_p_value: log-rank test between the two groups (nan if a
            group is empty).
    """

    threshold: float
    curves: dict[str, pd.DataFrame]
    group_sizes: dict[str, int]
    logrank_statistic: float
    logrank_p_value: float


def kaplan_meier_risk_groups(
    train_risk: np.ndarray, test_risk: np.ndarray, y_test: np.ndarray
) -> RiskGroupCurves:
    """Split test patients into low / high risk at the training median and compare survival.

    The threshold comes from training risks so the test split does not define its own groups
    (a test median would guarantee equal group sizes and bias the log-rank test).

    Args:
        train_risk: (n_train,) risks of the training rows.
        test_risk: (n_test,) risks of the test rows.
        y_test: (n_test, 2) (time, event) of the test rows.
    """
    y_test = as_survival_targets(y_test, "test")
    threshold = float(np.median(train_risk))
    is_high = np.asarray(test_risk) > threshold
    curves, sizes = {}, {}
    for name, members in (("low risk", ~is_high), ("high risk", is_high)):
        sizes[name] = int(members.sum())
        if not members.any():
            continue
        fitter = KaplanMeierFitter().fit(y_test[members, 0], y_test[members, 1], label=name)
        interval = fitter.confidence_interval_survival_function_
        curves[name] = pd.DataFrame(
            {
                "time": fitter.survival_function_.index.to_numpy(),
                "survival": fitter.survival_function_[name].to_numpy(),
                "lower": interval.iloc[:, 0].to_numpy(),
                "upper": interval.iloc[:, 1].to_numpy(),
            }
        )
    if len(curves) < 2:
        statistic = p_value = float("nan")
    else:
        test = logrank_test(
            y_test[~is_high, 0], y_test[is_high, 0], y_test[~is_high, 1], y_test[is_high, 1]
        )
        statistic, p_value = float(test.test_statistic), float(test.p_value)
    return RiskGroupCurves(threshold, curves, sizes, statistic, p_value)
