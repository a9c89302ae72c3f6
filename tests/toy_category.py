"""A toy eighth task category: the module docs/contributing.md adds, verbatim.

``train_mean`` predicts every test scan's target as the mean over the training scans, the
chance level of a regression task. tests/test_categories.py registers it with one line and
runs it through the same dispatch as the built-in categories.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from voxelfm.evaluation.results import PREDICTIONS_FILE, metric_rows
from voxelfm.stats.bootstrap import bootstrap_metrics


def run_train_mean(task, data, embeddings, bootstrap, out, context) -> pd.DataFrame:
    """Score the training-mean prediction on test (MAE, patient-level bootstrap)."""
    y = data.rows[task.labels[0]].to_numpy(dtype=np.float64)
    train, test = data.split_mask("train"), data.split_mask("test")
    predicted = np.full(int(test.sum()), y[train].mean())
    patients = data.rows.loc[test, "patient_id"].to_numpy()
    intervals = bootstrap_metrics(
        {"mae": lambda truth, guess: float(np.abs(truth - guess).mean())},
        y[test],
        predicted,
        patients,
        n_boot=bootstrap.n_boot,
        seed=bootstrap.seed,
        confidence=bootstrap.confidence,
    )
    data.rows.to_csv(out / PREDICTIONS_FILE, index=False)
    return pd.DataFrame(
        metric_rows(
            "train_mean",
            intervals,
            n_test_scans=int(test.sum()),
            n_test_patients=len(np.unique(patients)),
        )
    )
