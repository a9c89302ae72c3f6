"""Label-efficiency sweep: probe performance against the number of labelled training patients.

Only the training labels are limited: each subsample draws whole training patients, the probe
is selected on the full validation split and evaluated on the full test split, so every point
of the curve is measured against the same held-out patients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from voxelfm.probes.fitted import FittedProbe
from voxelfm.probes.registry import evaluate
from voxelfm.splits import subsample_patients

DEFAULT_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)


def label_efficiency_sweep(
    fit_select: Callable[..., FittedProbe],
    X_train: np.ndarray,
    y_train: np.ndarray,
    train_patient_ids: Sequence,
    X_val: np.ndarray,
    y_val: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    n_repeats: int = 5,
    seed: int = 0,
    stratify: Sequence | None = None,
    evaluate_probe: Callable[[FittedProbe, np.ndarray, np.ndarray], dict[str, float]] = evaluate,
) -> pd.DataFrame:
    """Fit and evaluate a probe on seeded subsamples of the training patients.

    Args:
        fit_select: a probe's ``fit_select_*`` function (see ``voxelfm.probes.registry``).
        train_patient_ids: (n_train,) patient of each training row.
        fractions: fractions of training patients; each is rounded to a patient count
            (at least 1) and repeated counts are run once.
        n_repeats: subsamples per count; the subsample and the probe's own seed both vary.
        stratify: optional (n_train,) per-row label; subsamples then contain every class.
        evaluate_probe: test metrics of a fitted probe (default: ``registry.evaluate``).

    Returns:
        Tidy frame, one row per (count, repeat, metric): ``n_train_patients``,
        ``n_train_scans``, ``repeat``, ``seed``, ``metric``, ``value``, ``hyperparameters``.
    """
    X_train, y_train = np.asarray(X_train), np.asarray(y_train)
    n_patients_total = len(np.unique(np.asarray(train_patient_ids)))
    patient_counts = sorted({max(1, round(f * n_patients_total)) for f in fractions})
    rows = []
    for n_patients in patient_counts:
        for repeat in range(n_repeats):
            run_seed = int(np.random.SeedSequence([seed, n_patients, repeat]).generate_state(1)[0])
            subset = subsample_patients(train_patient_ids, n_patients, run_seed, stratify)
            probe = fit_select(X_train[subset], y_train[subset], X_val, y_val, seed=run_seed)
            for metric, value in evaluate_probe(probe, X_test, y_test).items():
                rows.append(
                    {
                        "n_train_patients": n_patients,
                        "n_train_scans": len(subset),
                        "repeat": repeat,
                        "seed": run_seed,
                        "metric": metric,
                        "value": value,
                        "hyperparameters": dict(probe.hyperparameters),
                    }
                )
    return pd.DataFrame(rows)
