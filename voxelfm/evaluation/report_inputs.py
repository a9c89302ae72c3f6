"""What the report reads from one folder ``run_task`` wrote.

The tables, the paired comparisons and the figures all read the same few files (named in
``voxelfm.evaluation.results``); reading them here keeps one answer to "which probes stored
scores" and "which columns are the task's labels".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from voxelfm.evaluation.results import EFFICIENCY_FILE, PREDICTIONS_FILE, TASK_FILE


def task_record(result_dir: Path) -> dict[str, Any]:
    """The folder's ``task.json``: the task, row counts per split, the scans left out."""
    return json.loads((result_dir / TASK_FILE).read_text())


def task_labels(result_dir: Path) -> list[str]:
    """The label-table columns the folder's task names."""
    return task_record(result_dir)["task"]["labels"]


def read_test_predictions(result_dir: Path) -> pd.DataFrame:
    """Test rows of ``predictions.csv``, indexed by scan_id."""
    predictions = pd.read_csv(
        result_dir / PREDICTIONS_FILE, dtype={"scan_id": str, "patient_id": str}
    )
    return predictions[predictions["split"] == "test"].set_index("scan_id")


def scored_probes(predictions: pd.DataFrame) -> list[str]:
    """The probes that stored scores (``score:<probe>[:<j>]`` columns), in column order."""
    probes = [c.split(":")[1] for c in predictions.columns if c.startswith("score:")]
    return list(dict.fromkeys(probes))


def efficiency_table(per_backbone: Mapping[str, Path]) -> pd.DataFrame | None:
    """Every backbone's ``efficiency.csv`` with a backbone column; None when none wrote one."""
    frames = [
        pd.read_csv(path / EFFICIENCY_FILE).assign(backbone=backbone)
        for backbone, path in per_backbone.items()
        if (path / EFFICIENCY_FILE).is_file()
    ]
    return pd.concat(frames, ignore_index=True) if frames else None
