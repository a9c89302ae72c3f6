"""Run one task for one backbone: fit every probe, evaluate once on test, bootstrap, sweep.

Writes into ``out_dir`` (atomically, as one folder):

* ``metrics.csv``: one row per (probe, metric): estimate, 95% bootstrap interval over test
  patients, hyper-parameters chosen on validation and the validation score;
* ``predictions.csv``: every scan of every split with each probe's scores (``score:<probe>``,
  or ``score:<probe>:<j>`` for several columns), so the report can draw ROC and
  Kaplan-Meier curves and pair backbones on the same test patients without refitting;
* ``efficiency.csv``: the label-fraction sweep of the task's first probe (if configured);
* ``retrieval_ranks.csv`` (retrieval tasks): the rank of every query or trial;
* ``task.json``: the task, row counts per split and the scans left out with the reason.

Localisation, segmentation and report generation are run by their own modules
(``DENSE_RUNNERS``), which write ``metrics.csv`` rows in the same schema (via
:func:`metric_rows`) plus their own prediction files.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation.tasks import (
    DENSE_PROBES,
    SPLITS,
    TOKEN_PROBES,
    TaskData,
    TaskSpec,
    align_task,
)
from voxelfm.utils.atomic import atomic_directory
from voxelfm.utils.jsonable import to_jsonable

METRICS_FILE = "metrics.csv"
PREDICTIONS_FILE = "predictions.csv"
EFFICIENCY_FILE = "efficiency.csv"
RANKS_FILE = "retrieval_ranks.csv"
TASK_FILE = "task.json"

# category -> "module:function" with the signature
# (task, data, embeddings, bootstrap, out_dir, context) -> pd.DataFrame of metric rows.
DENSE_RUNNERS: dict[str, str] = {
    "localisation": "voxelfm.evaluation.localisation:run_localisation",
    "segmentation": "voxelfm.evaluation.segmentation:run_segmentation",
    "report_generation": "voxelfm.evaluation.report_generation:run_report_generation",
}


@dataclass(frozen=True)
class BootstrapSettings:
    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def from_config(cls, spec: Mapping[str, Any] | None) -> BootstrapSettings:
        return cls(**dict(spec or {}))


@dataclass
class DenseContext:
    """What dense probes need beyond the embeddings and the label table.

    volumes: a ``voxelfm.store.VolumeStore`` holding the scans and their label maps on the
        canonical grid (segmentation targets), or None.
    sources: scan_id -> path of the source image (manifest ``image``), so predicted label
        maps can be written back in the source image's space; empty: no write-back.
    """

    volumes: Any = None
    sources: Mapping[str, str] = field(default_factory=dict)


def run_task(
    embeddings,
    labels: pd.DataFrame,
    task: TaskSpec,
    out_dir: str | os.PathLike,
    *,
    bootstrap: BootstrapSettings | None = None,
    labels_source: str = "label table",
    context: DenseContext | None = None,
) -> Path:
    """Evaluate ``task`` on the embeddings of one backbone; returns ``out_dir``.

    Args:
        embeddings: a ``voxelfm.extract.EmbeddingStore`` (scan_ids, patient_ids,
            global_features, pooled_patch_grid).
        labels: the label table (see ``tasks.read_label_table``).
        context: volumes and source paths for the dense categories (see DenseContext).
    """
    bootstrap = bootstrap or BootstrapSettings()
    data = align_task(
        task, labels, embeddings.scan_ids, embeddings.patient_ids, source=labels_source
    )
    features = embeddings.global_features(task.features)[data.embedding_rows]
    with atomic_directory(out_dir) as tmp:
        if task.category == "retrieval":
            metrics = _run_retrieval(task, data, features, bootstrap, tmp)
        elif task.category in DENSE_PROBES:
            context = context or DenseContext()
            if task.category == "segmentation":
                data = _scans_with_label_map(task, data, context.volumes)
            runner = dense_runner(task.category)
            metrics = runner(task, data, embeddings, bootstrap, tmp, context)
        else:
            metrics = _run_probes(task, data, features, embeddings, bootstrap, tmp)
        metrics.insert(0, "task", task.name)
        metrics.insert(1, "category", task.category)
        metrics.to_csv(tmp / METRICS_FILE, index=False)
        summary = {
            "task": {k: v for k, v in asdict(task).items() if k != "extra"},
            "n_scans": {s: int(data.split_mask(s).sum()) for s in SPLITS},
            "n_patients": {
                s: int(data.rows.loc[data.split_mask(s), "patient_id"].nunique()) for s in SPLITS
            },
            "dropped_scans": data.dropped,
            "backbone": embeddings.attrs.get("backbone"),
        }
        (tmp / TASK_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return Path(out_dir)


def dense_runner(category: str):
    """The runner function of a dense or language category (see ``DENSE_RUNNERS``)."""
    try:
        module_name, function_name = DENSE_RUNNERS[category].split(":")
    except KeyError:
        raise VoxelFMError(f"no runner for task category {category!r}") from None
    return getattr(importlib.import_module(module_name), function_name)


def _scans_with_label_map(task: TaskSpec, data: TaskData, volumes) -> TaskData:
    """Leave out (and report) the scans whose volume has no ``options.label_map``: a
    collection mixes cohorts, and only some are contoured for a given structure set."""
    name = task.options.get("label_map")
    if volumes is None or name is None:
        return data  # the runner says what is missing
    has_map = np.array(
        [s in volumes and name in volumes.label_names(s) for s in data.rows["scan_id"]], bool
    )
    if has_map.all():
        return data
    dropped = dict(data.dropped)
    for scan_id in data.rows.loc[~has_map, "scan_id"]:
        dropped[scan_id] = f"no label map {name!r}"
    rows = data.rows[has_map].reset_index(drop=True)
    empty = [split for split in SPLITS if not (rows["split"] == split).any()]
    if empty:
        raise VoxelFMError(
            f"task {task.name!r}: no scans with label map {name!r} in split(s) {empty}"
        )
    return TaskData(rows, data.embedding_rows[has_map], dropped)


def _token_inputs(embeddings, data: TaskData, task: TaskSpec) -> np.ndarray | None:
    """(n, T, D) patch tokens pooled to ``task.token_grid``, or None without patch tokens."""
    pooled = [
        embeddings.pooled_patch_grid(scan_id, grid=task.token_grid) for scan_id in data.rows.scan_id
    ]
    if any(tokens is None for tokens in pooled):
        return None
    return np.stack(pooled).astype(np.float32)


def _run_probes(
    task: TaskSpec,
    data: TaskData,
    features: np.ndarray,
    embeddings,
    bootstrap: BootstrapSettings,
    out: Path,
) -> pd.DataFrame:
    from voxelfm.probes.registry import evaluate, metric_functions, probe_fitter
    from voxelfm.stats.bootstrap import bootstrap_metrics

    y = data.targets(task)
    masks = {s: data.split_mask(s) for s in SPLITS}
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
        _add_score_columns(predictions, probe_name, scores)
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
            _write_efficiency_sweep(task, fit_select, inputs, y, data, masks, evaluate, out)
    predictions.to_csv(out / PREDICTIONS_FILE, index=False)
    return pd.DataFrame(rows)


def _write_efficiency_sweep(task, fit_select, inputs, y, data, masks, evaluate, out) -> None:
    from voxelfm.stats.efficiency import label_efficiency_sweep

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


def _run_retrieval(
    task: TaskSpec, data: TaskData, features: np.ndarray, bootstrap: BootstrapSettings, out: Path
) -> pd.DataFrame:
    from voxelfm.probes.retrieval import (
        DEFAULT_KS,
        N_NEGATIVES,
        instance_gallery_ranks,
        instance_pool_trials,
    )
    from voxelfm.stats.bootstrap import bootstrap_grouped_means

    patient_ids = data.rows["patient_id"].to_numpy()
    rows, rank_frames = [], []
    for protocol in task.probes:
        if protocol == "gallery":
            ranks = instance_gallery_ranks(features, patient_ids, seed=task.seed)
            rank_column, note = "first_positive_rank", "all other scans are the gallery"
            per_row = {f"recall@{k}": (ranks[rank_column] <= k).to_numpy() for k in DEFAULT_KS}
            per_row["mAP"] = ranks["average_precision"].to_numpy()
        else:
            # The paper draws 99 negatives; a cohort with fewer other patients uses them all,
            # and the note records the pool so chance level (k / pool) can be read off.
            max_negatives = _min_other_patient_scans(patient_ids)
            n_negatives = min(N_NEGATIVES, max_negatives)
            ranks = instance_pool_trials(
                features, patient_ids, n_negatives=n_negatives, seed=task.seed
            )
            rank_column, note = "rank", f"1 positive among {n_negatives} random negatives"
            per_row = {f"recall@{k}": (ranks[rank_column] <= k).to_numpy() for k in DEFAULT_KS}
        query_patients = patient_ids[ranks["query"].to_numpy()]
        intervals = bootstrap_grouped_means(
            per_row,
            query_patients,
            n_boot=bootstrap.n_boot,
            seed=bootstrap.seed,
            confidence=bootstrap.confidence,
        )
        rows += metric_rows(
            protocol,
            intervals,
            n_test_scans=len(ranks),
            n_test_patients=len(np.unique(query_patients)),
            note=note,
        )
        rank_frames.append(
            pd.DataFrame(
                {
                    "protocol": protocol,
                    "query_scan": data.rows["scan_id"].to_numpy()[ranks["query"].to_numpy()],
                    "query_patient": query_patients,
                    "rank": ranks[rank_column].to_numpy(),
                    "pool_size": (len(features) - 1 if protocol == "gallery" else n_negatives + 1),
                }
            )
        )
    pd.concat(rank_frames, ignore_index=True).to_csv(out / RANKS_FILE, index=False)
    data.rows.to_csv(out / PREDICTIONS_FILE, index=False)
    return pd.DataFrame(rows)


def _min_other_patient_scans(patient_ids: np.ndarray) -> int:
    _, counts = np.unique(patient_ids, return_counts=True)
    return int(len(patient_ids) - counts.max())


def metric_rows(probe: str, intervals: Mapping[str, Any], **columns: Any) -> list[dict]:
    """One metrics.csv row per bootstrapped metric; ``columns`` fill the shared fields."""
    shared = {
        "validation_score": np.nan,
        "hyperparameters": "{}",
        "decision_threshold": "null",
        "note": "",
        **columns,
    }
    return [
        {
            "probe": probe,
            "metric": metric,
            "estimate": result.estimate,
            "ci_low": result.lower,
            "ci_high": result.upper,
            "n_boot_valid": result.n_boot_valid,
            **shared,
        }
        for metric, result in intervals.items()
    ]


def skipped_row(probe: str, reason: str) -> dict[str, Any]:
    return {"probe": probe, "metric": None, "estimate": np.nan, "note": f"skipped: {reason}"}


def _add_score_columns(frame: pd.DataFrame, probe: str, scores: np.ndarray) -> None:
    if scores.ndim == 1:
        frame[f"score:{probe}"] = scores
    else:
        for j in range(scores.shape[1]):
            frame[f"score:{probe}:{j}"] = scores[:, j]


def score_matrix(predictions: pd.DataFrame, probe: str) -> np.ndarray:
    """The scores ``_add_score_columns`` stored for ``probe``: (n,) or (n, k)."""
    if f"score:{probe}" in predictions:
        return predictions[f"score:{probe}"].to_numpy()
    columns = sorted(
        (c for c in predictions.columns if c.startswith(f"score:{probe}:")),
        key=lambda c: int(c.rsplit(":", 1)[1]),
    )
    if not columns:
        raise KeyError(f"no scores of probe {probe!r}")
    return predictions[columns].to_numpy()
