"""Probes by name, and the single place where test data meets a fitted probe.

Every fitter has the signature ``(X_train, y_train, X_val, y_val, *, seed, **hyper-parameters)
-> FittedProbe``. The probe modules import their heavy libraries (sklearn, scipy, lifelines,
torch) at the top; this table reaches each one through a loader called when a probe is fitted
or scored, never when the table is imported. The Snakefile reads the task categories, and
through them this table, at parse time (once per job on a cluster), and the classical probes,
the bootstrap and the report run without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from voxelfm.errors import VoxelFMError
from voxelfm.probes.fitted import FittedProbe, Task

MetricFn = Callable[[np.ndarray, np.ndarray], float]
Fitter = Callable[..., FittedProbe]


# Each loader imports one probe module on call: the deferred import is the point (see above).
def _classification() -> ModuleType:
    from voxelfm.probes import classification

    return classification


def _regression() -> ModuleType:
    from voxelfm.probes import regression

    return regression


def _survival() -> ModuleType:
    from voxelfm.probes import survival

    return survival


def _attentive() -> ModuleType:
    from voxelfm.probes import attentive

    return attentive


def _mlp_regression() -> ModuleType:
    from voxelfm.probes import mlp_regression

    return mlp_regression


def _cox_mlp() -> ModuleType:
    from voxelfm.probes import cox_mlp

    return cox_mlp


def _on_call(load: Callable[[], Fitter]) -> Fitter:
    """A fitter that loads the real one (importing its module) when called.

    It passes on the train and validation arrays only, so test rows cannot reach selection
    through the registry; ``fit.load()`` gives the real fitter (its signature is tested too).
    """

    def fit(
        X_train: np.ndarray,
        y_train: np.ndarray,
        X_val: np.ndarray,
        y_val: np.ndarray,
        *,
        seed: int = 0,
        **hyperparameters: Any,
    ) -> FittedProbe:
        return load()(X_train, y_train, X_val, y_val, seed=seed, **hyperparameters)

    fit.load = load  # type: ignore[attr-defined]
    return fit


# task -> probe name -> fitter.
PROBE_FITTERS: dict[str, dict[str, Fitter]] = {
    "classification": {
        "logistic": _on_call(lambda: _classification().fit_select_logistic),
        "knn": _on_call(lambda: _classification().fit_select_knn),
        "attentive": _on_call(lambda: _attentive().fit_select_attentive),
    },
    "regression": {
        "ridge": _on_call(lambda: _regression().fit_select_ridge),
        "mlp": _on_call(lambda: _mlp_regression().fit_select_mlp_regressor),
    },
    "survival": {
        "cox": _on_call(lambda: _survival().fit_select_cox),
        "mlp_cox": _on_call(lambda: _cox_mlp().fit_select_mlp_cox),
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
        return _classification().metric_functions(probe.decision_threshold)
    if probe.task == "regression":
        return _regression().metric_functions()
    return _survival().metric_functions()


def evaluate(probe: FittedProbe, X_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Point estimates of every test metric for ``probe`` (see ``voxelfm.stats`` for CIs)."""
    scores = probe.predict(X_test)
    return {
        name: metric(np.asarray(y_test), scores) for name, metric in metric_functions(probe).items()
    }
