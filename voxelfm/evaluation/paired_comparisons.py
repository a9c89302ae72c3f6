"""Paired comparisons of backbones: the reference backbone against each other one.

Both arms are scored on the same test scans from the ``predictions.csv`` their runs wrote
(no refitting), and ``stats.bootstrap.paired_bootstrap`` resamples their patients together,
so the patient-to-patient variation both arms share cancels in the difference.

Only the categories with one score per scan are paired (:data:`PAIRED_METRICS`). Balanced
accuracy is not paired: its threshold is chosen per backbone on validation, so the two arms
would not be scored by the same function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from voxelfm.evaluation.report_inputs import read_test_predictions, scored_probes, task_labels
from voxelfm.evaluation.results import BootstrapSettings, score_matrix
from voxelfm.stats.bootstrap import paired_bootstrap

PAIRED_METRICS = {
    "classification": ("auroc", "auprc"),
    "regression": ("mae", "r2", "pearson_r"),
    "survival": ("c_index",),
}
# The columns of paired.csv, in order (also when no task is paired).
PAIRED_COLUMNS = [
    "task",
    "probe",
    "metric",
    "reference",
    "other",
    "estimate_reference",
    "estimate_other",
    "difference",
    "ci_low",
    "ci_high",
    "p_value",
    "n_test_scans",
]


def paired_comparisons(
    results: Mapping[tuple[str, str], Path],
    tasks: Sequence[str],
    backbones: Sequence[str],
    categories: Mapping[str, str],
    bootstrap: BootstrapSettings,
) -> pd.DataFrame:
    """The rows of paired.csv: every probe and paired metric of every task, the first of
    ``backbones`` (the reference) against each other one that ran the task."""
    # The probes' metric functions bring sklearn, scipy and lifelines: only when pairing.
    from voxelfm.probes import classification, regression, survival

    metric_sources = {
        "classification": classification.metric_functions(None),
        "regression": regression.metric_functions(),
        "survival": survival.metric_functions(),
    }
    reference, others = backbones[0], backbones[1:]
    rows = []
    for task in tasks:
        category = categories[task]
        if category not in PAIRED_METRICS or (task, reference) not in results:
            continue  # retrieval and the dense categories have no per-scan score pairing
        functions = {m: metric_sources[category][m] for m in PAIRED_METRICS[category]}
        ref_predictions = read_test_predictions(results[(task, reference)])
        labels = task_labels(results[(task, reference)])
        for other in others:
            if (task, other) not in results:
                continue
            other_predictions = read_test_predictions(results[(task, other)])
            common = ref_predictions.index.intersection(other_predictions.index, sort=False)
            ref_rows, other_rows = ref_predictions.loc[common], other_predictions.loc[common]
            y = _targets(ref_rows, category, labels)
            for probe in scored_probes(ref_rows):
                try:
                    scores_ref = score_matrix(ref_rows, probe)
                    scores_other = score_matrix(other_rows, probe)
                except KeyError:  # the other backbone skipped this probe
                    continue
                compared = paired_bootstrap(
                    functions,
                    y,
                    scores_ref,
                    scores_other,
                    ref_rows["patient_id"].to_numpy(),
                    n_boot=bootstrap.n_boot,
                    seed=bootstrap.seed,
                    confidence=bootstrap.confidence,
                )
                for metric, result in compared.items():
                    rows.append(
                        {
                            "task": task,
                            "probe": probe,
                            "metric": metric,
                            "reference": reference,
                            "other": other,
                            "estimate_reference": result.estimate_a,
                            "estimate_other": result.estimate_b,
                            "difference": result.difference,
                            "ci_low": result.lower,
                            "ci_high": result.upper,
                            "p_value": result.p_value,
                            "n_test_scans": len(common),
                        }
                    )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def _targets(rows: pd.DataFrame, category: str, labels: Sequence[str]) -> np.ndarray:
    if category == "survival":
        return rows[list(labels)].to_numpy(dtype=np.float64)
    if category == "regression":
        return rows[labels[0]].to_numpy(dtype=np.float64)
    columns = labels[0] if len(labels) == 1 else list(labels)
    return rows[columns].to_numpy(dtype=np.int64)
