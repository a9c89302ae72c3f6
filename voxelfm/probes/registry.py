"""Probes by name, and the single place where test data meets a fitted probe.

Every fitter has the signature ``(X_train, y_train, X_val, y_val, *, seed, **hyper-parameters)
-> FittedProbe``. The network probes import torch when they are fitted, not when this module
is imported: their entries below are thin functions that import the probe module on call, so
that the classical probes, the bootstrap and the report run without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from voxelfm.errors import VoxelFMError
from voxelfm.probes import classification, regression, survival
from voxelfm.probes.fitted import FittedProbe, Task

MetricFn = Callable[[np.ndarray, np.ndarray], float]
Fitter = Callable[..., FittedProbe]


def fit_select_attentive(
    tokens_train: np.ndarray,
    y_train: np.ndarray,
    tokens_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int = 0,
    **hyperparameters: Any,
) -> FittedProbe:
    """``voxelfm.probes.attentive.fit_select_attentive`` (imports torch on call)."""
    from voxelfm.probes import attentive

    return attentive.fit_select_attentive(
        tokens_train, y_train, tokens_val, y_val, seed=seed, **hyperparameters
    )


def fit_select_mlp_regressor(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int = 0,
    **hyperparameters: Any,
) -> FittedProbe:
    """``voxelfm.probes.mlp_regression.fit_select_mlp_regressor`` (imports torch on call)."""
    from voxelfm.probes import mlp_regression

    return mlp_regression.fit_select_mlp_regressor(
        X_train, y_train, X_val, y_val, seed=seed, **hyperparameters
    )


def fit_select_mlp_cox(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int = 0,
    **hyperparameters: Any,
) -> FittedProbe:
    """``voxelfm.probes.cox_mlp.fit_select_mlp_cox`` (imports torch on call)."""
    from voxelfm.probes import cox_mlp

    return cox_mlp.fit_select_mlp_cox(X_train, y_train, X_val, y_val, seed=seed, **hyperparameters)


# task -> probe name -> fitter.
PROBE_FITTERS: dict[str, dict[str, Fitter]] = {
    "classification": {
        "logistic": classification.fit_select_logistic,
        "knn": classification.fit_select_knn,
        "attentive": fit_select_attentive,
    },
    "regression": {
        "ridge": regression.fit_select_ridge,
        "mlp": fit_select_mlp_regressor,
    },
    "survival": {
        "cox": survival.fit_select_cox,
        "mlp_cox": fit_select_mlp_cox,
    },
}
# Probes that read patch tokens (pooled to a fixed grid) instead of one vector per scan.
TOKEN_PROBES = frozenset({"attentive"})


def probe_fitter(task: Task, name: str) -> Fitter:
    """The ``fit_select`` function of probe ``name`` for ``task``."""
    try:
        return PROBE_FITTERS[task][name]
    except KeyError:
        known = {t: sorted(names) for t, names in PROBE_FITTERS.items()}
        raise VoxelFMError(f"unknown probe {name!r} for task {task!r}; known: {known}") from None


def metric_functions(probe: FittedProbe) -> dict[str, MetricFn]:
    """The test metrics of ``probe``'s task as ``(y_true, scores) -> float``."""
    if probe.task == "classification":
        return classification.metric_functions(probe.decision_threshold)
    if probe.task == "regression":
        return regression.metric_functions()
    return survival.metric_functions()


def evaluate(probe: FittedProbe, X_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Point estimates of every test metric for ``probe`` (see ``voxelfm.stats`` for CIs)."""
    scores = probe.predict(X_test)
    return {
        name: metric(np.asarray(y_test), scores) for name, metric in metric_functions(probe).items()
    }
