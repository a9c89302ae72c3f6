"""Probes by name, and the single place where test data meets a fitted probe.

Fitters are resolved lazily so naming a network probe is what imports torch, not importing
this module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from voxelfm.errors import VoxelFMError
from voxelfm.probes import classification, regression, survival
from voxelfm.probes.fitted import FittedProbe, Task

MetricFn = Callable[[np.ndarray, np.ndarray], float]

# task -> probe name -> "module:function"; every function has the signature
# (X_train, y_train, X_val, y_val, *, seed, **hyper-parameters) -> FittedProbe.
PROBE_FITTERS: dict[str, dict[str, str]] = {
    "classification": {
        "logistic": "voxelfm.probes.classification:fit_select_logistic",
        "knn": "voxelfm.probes.classification:fit_select_knn",
        "attentive": "voxelfm.probes.attentive:fit_select_attentive",
    },
    "regression": {
        "ridge": "voxelfm.probes.regression:fit_select_ridge",
        "mlp": "voxelfm.probes.mlp_regression:fit_select_mlp_regressor",
    },
    "survival": {
        "cox": "voxelfm.probes.survival:fit_select_cox",
        "mlp_cox": "voxelfm.probes.cox_mlp:fit_select_mlp_cox",
    },
}


def probe_fitter(task: Task, name: str) -> Callable[..., FittedProbe]:
    """The ``fit_select`` function of probe ``name`` for ``task``."""
    try:
        target = PROBE_FITTERS[task][name]
    except KeyError:
        known = {t: sorted(names) for t, names in PROBE_FITTERS.items()}
        raise VoxelFMError(f"unknown probe {name!r} for task {task!r}; known: {known}") from None
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


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
