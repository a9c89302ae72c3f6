"""Run one task for one backbone: align labels with embeddings, dispatch to its category.

Writes into ``out_dir`` (atomically, as one folder):

* ``metrics.csv``: one row per (probe, metric): estimate, 95% bootstrap interval over test
  patients, hyper-parameters chosen on validation and the validation score;
* ``predictions.csv``: every scan of every split with each probe's scores (``score:<probe>``,
  or ``score:<probe>:<j>`` for several columns), so the report can draw ROC and
  Kaplan-Meier curves and pair backbones on the same test patients without refitting;
* ``task.json``: the task, row counts per split and the scans left out with the reason;
* whatever the category's runner writes besides (``efficiency.csv``, ``retrieval_ranks.csv``,
  ``selection.csv``, figures; see ``voxelfm.evaluation.categories``).

The file names, settings and row helpers every category shares live in
``voxelfm.evaluation.results``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from voxelfm.evaluation.categories import CATEGORIES
from voxelfm.evaluation.results import METRICS_FILE, TASK_FILE, BootstrapSettings, DenseContext
from voxelfm.evaluation.tasks import SPLITS, EvaluationTask, align_task
from voxelfm.utils.atomic import atomic_directory

__all__ = ["run_task"]


def run_task(
    embeddings,
    labels: pd.DataFrame,
    task: EvaluationTask,
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
    context = context or DenseContext()
    category = CATEGORIES[task.category]
    data = align_task(
        task, labels, embeddings.scan_ids, embeddings.patient_ids, source=labels_source
    )
    if category.prepare is not None:
        data = category.prepare(task, data, context)
    with atomic_directory(out_dir) as tmp:
        metrics = category.runner(task, data, embeddings, bootstrap, tmp, context)
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
