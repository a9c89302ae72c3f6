"""The classification, regression and survival categories: probes on one vector per scan.

Every probe of the task is fitted on train with hyper-parameters chosen on validation
(``voxelfm.probes.registry``), scores every scan, and is evaluated once on test with
patient-level bootstrap intervals. Token probes (``TOKEN_PROBES``) see the patch tokens
pooled to ``task.token_grid`` instead of the global vector. Writes ``predictions.csv`` (each
probe's scores for every scan) and, with ``label_fractions``, ``efficiency.csv`` (the
label-fraction sweep of the task's first probe).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from voxelfm.evaluation.results import (
    EFFICIENCY_FILE,
    PREDICTIONS_FILE,
    BootstrapSettings,
    DenseContext,
    add_score_columns,
    metric_rows,
    skipped_row,
)
from voxelfm.probes.registry import TOKEN_PROBES, evaluate, metric_functions, probe_fitter
from voxelfm.splits import SPLIT_NAMES
from voxelfm.stats.bootstrap import bootstrap_metrics
from voxelfm.stats.efficiency import label_efficiency_sweep
from voxelfm.utils.jsonable import to_jsonable


def run_vector_probes(
    task,
    data,
    embeddings,
    bootstrap: BootstrapSettings,
    out: Path,
    context: DenseContext,
) -> pd.DataFrame:
    """Fit, score and bootstrap every probe of ``task``; returns the metric rows."""
    features = embeddings.global_features(task.features)[data.embedding_rows]
    y = data.targets(task)
    masks = {s: data.split_mask(s) for s in SPLIT_NAMES}
    test_patients = data.rows.loc[masks["test"], "patient_id"].to_numpy()
    tokens = None
    predictions = data.rows.copy()
    rows = []
    for probe_name in task.probes:
        if probe_name in TOKEN_PROBES:
            tokens = tokens if tokens is not None else _token_inputs(embeddings, data, task)
            if tokens is None:
                rows.append(skipped_row(probe_name, "the backbone has no patch tokens"))
                continue
            inputs = tokens
        else:
            inputs = features
        fit_select = probe_fitter(task.category, probe_name)
        probe = fit_select(
            inputs[masks["train"]],
            y[masks["train"]],
            inputs[masks["val"]],
            y[masks["val"]],
            seed=task.seed,
        )
        scores = np.asarray(probe.predict(inputs))
        add_score_columns(predictions, probe_name, scores)
        intervals = bootstrap_metrics(
            metric_functions(probe),
            y[masks["test"]],
            scores[masks["test"]],
            test_patients,
            n_boot=bootstrap.n_boot,
            seed=bootstrap.seed,
            confidence=bootstrap.confidence,
        )
        rows += metric_rows(
            probe_name,
            intervals,
            n_test_scans=int(masks["test"].sum()),
            n_test_patients=len(np.unique(test_patients)),
            validation_score=probe.validation_score,
            hyperparameters=json.dumps(to_jsonable(probe.hyperparameters)),
            decision_threshold=json.dumps(to_jsonable(probe.decision_threshold)),
        )
        if task.label_fractions and probe_name == task.probes[0]:
            _write_efficiency_sweep(task, fit_select, inputs, y, data, masks, out)
    predictions.to_csv(out / PREDICTIONS_FILE, index=False)
    return pd.DataFrame(rows)


def _token_inputs(embeddings, data, task) -> np.ndarray | None:
    """(n, T, D) patch tokens pooled to ``task.token_grid``, or None without patch tokens."""
    pooled = [
        embeddings.pooled_patch_grid(scan_id, grid=task.token_grid) for scan_id in data.rows.scan_id
    ]
    if any(tokens is None for tokens in pooled):
        return None
    return np.stack(pooled).astype(np.float32)


def _write_efficiency_sweep(task, fit_select, inputs, y, data, masks, out: Path) -> None:
    train_rows = data.rows[masks["train"]]
    stratify = y[masks["train"]] if task.category == "classification" and y.ndim == 1 else None
    sweep = label_efficiency_sweep(
        fit_select,
        inputs[masks["train"]],
        y[masks["train"]],
        train_rows["patient_id"].to_numpy(),
        inputs[masks["val"]],
        y[masks["val"]],
        inputs[masks["test"]],
        y[masks["test"]],
        fractions=task.label_fractions,
        n_repeats=task.sweep_repeats,
        seed=task.seed,
        stratify=stratify,
        evaluate_probe=evaluate,
    )
    sweep.insert(0, "probe", task.probes[0])
    sweep["hyperparameters"] = sweep["hyperparameters"].map(lambda h: json.dumps(to_jsonable(h)))
    sweep.to_csv(out / EFFICIENCY_FILE, index=False)
