"""Tasks as configuration: what a probe predicts, from which columns, on which split.

A task is a mapping from the workflow config (``evaluation.tasks.<name>``), e.g.::

    finding:      {category: classification, labels: [finding], probes: [logistic, knn]}
    liver_volume: {category: regression, labels: [target], probes: [ridge, mlp]}
    survival:     {category: survival, labels: [survival_time, event], probes: [cox]}
    repeat_scan:  {category: retrieval, probes: [gallery, pool]}

``labels`` names the label-table columns: one column (binary or multi-class) or several 0/1
columns (multi-label) for classification, one for regression, (time, event) for survival,
none for instance retrieval (positives are the other scans of the same patient). The split
comes from the table's ``split_column`` (train / val / test per scan) and is checked to be
patient-level before anything is fitted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation.categories import CATEGORIES
from voxelfm.label_table import read_label_table
from voxelfm.splits import SPLIT_NAMES as SPLITS
from voxelfm.splits import check_patient_level_split

FeatureKind = Literal["cls", "pooled", "cls+pooled"]

__all__ = ["SPLITS", "EvaluationTask", "TaskData", "align_task", "read_label_table"]

_SPLIT_ALIASES = {"validation": "val", "valid": "val", "training": "train", "testing": "test"}


@dataclass(frozen=True)
class EvaluationTask:
    """One evaluation task, validated.

    Attributes:
        name: task name (the workflow wildcard).
        category: a key of ``voxelfm.evaluation.categories.CATEGORIES``.
        labels: label-table columns (see the module docstring).
        probes: probe names the category accepts (``TaskCategory.probes``).
        features: which global embedding the vector probes see.
        split_column: label-table column holding train / val / test.
        token_grid: patch tokens are average-pooled to this grid for token probes.
        label_fractions: fractions of training patients for the data-efficiency sweep
            (empty: no sweep); the sweep runs the first probe of the list.
        sweep_repeats: subsamples per fraction.
        seed: seeds probe initialisation and the sweep's subsamples.
        options: category-specific options of the dense and language probes (e.g.
            ``hit_radius_mm``, ``label_map``, ``classes``), parsed by the category's
            ``options`` when its runner runs.
    """

    name: str
    category: str
    labels: tuple[str, ...]
    probes: tuple[str, ...]
    features: FeatureKind = "cls+pooled"
    split_column: str = "split"
    token_grid: tuple[int, int, int] = (4, 4, 4)
    label_fractions: tuple[float, ...] = ()
    sweep_repeats: int = 3
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, name: str, spec: Mapping[str, Any]) -> EvaluationTask:
        spec = dict(spec)
        category = spec.pop("category", None)
        if category not in CATEGORIES:
            raise VoxelFMError(
                f"task {name!r}: category must be one of {sorted(CATEGORIES)}, got {category!r}"
            )
        declared = CATEGORIES[category]
        labels = tuple(spec.pop("labels", ()) or ())
        expected = declared.label_columns
        if expected is not None and len(labels) != expected:
            raise VoxelFMError(
                f"task {name!r}: a {category} task needs {expected} label column(s), "
                f"got {list(labels)}"
            )
        if expected is None and not labels:
            raise VoxelFMError(f"task {name!r}: a {category} task needs label column(s)")
        probes = tuple(spec.pop("probes", None) or declared.default_probes)
        unknown = sorted(set(probes) - set(declared.probes))
        if unknown:
            kind = "protocol" if category == "retrieval" else "probe"
            raise VoxelFMError(
                f"task {name!r}: unknown {category} {kind}(s) {unknown}; "
                f"known: {list(declared.probes)}"
            )
        features = spec.pop("features", "cls+pooled")
        if features not in ("cls", "pooled", "cls+pooled"):
            raise VoxelFMError(f"task {name!r}: features must be cls, pooled or cls+pooled")
        known = {
            "split_column": str,
            "token_grid": lambda v: tuple(int(x) for x in v),
            "label_fractions": lambda v: tuple(float(x) for x in v),
            "sweep_repeats": int,
            "seed": int,
        }
        options = {key: convert(spec.pop(key)) for key, convert in known.items() if key in spec}
        category_options = spec.pop("options", None) or {}
        if not isinstance(category_options, Mapping):
            raise VoxelFMError(f"task {name!r}: options must be a mapping")
        if category_options and declared.options is None:
            raise VoxelFMError(f"task {name!r}: a {category} task takes no options")
        spec.pop("description", None)
        if spec:
            raise VoxelFMError(f"task {name!r}: unknown setting(s) {sorted(spec)}")
        return cls(
            name=name,
            category=category,
            labels=labels,
            probes=probes,
            features=features,
            options=dict(category_options),
            **options,
        )


@dataclass(frozen=True)
class TaskData:
    """The rows of one task: embeddings aligned with labels and splits.

    Attributes:
        rows: one row per usable scan (scan_id, patient_id, split, the label columns), in the
            order of the embedding store.
        embedding_rows: (n,) row index of each scan in the embedding store.
        dropped: scan_id -> why it is not used (no embedding, missing label, no split).
    """

    rows: pd.DataFrame
    embedding_rows: np.ndarray
    dropped: dict[str, str]

    def split_mask(self, split: str) -> np.ndarray:
        return (self.rows["split"] == split).to_numpy()

    def targets(self, task: EvaluationTask) -> np.ndarray:
        """Targets in the probes' convention (see ``voxelfm.probes``)."""
        if task.category == "survival":
            return self.rows[list(task.labels)].to_numpy(dtype=np.float64)
        if task.category == "regression":
            return self.rows[task.labels[0]].to_numpy(dtype=np.float64)
        if len(task.labels) == 1:
            return self.rows[task.labels[0]].to_numpy(dtype=np.int64)
        return self.rows[list(task.labels)].to_numpy(dtype=np.int64)


def align_task(
    task: EvaluationTask,
    labels: pd.DataFrame,
    scan_ids: Sequence[str],
    patient_ids: Sequence[str],
    *,
    source: str = "label table",
) -> TaskData:
    """Join embeddings and labels by scan, normalise the split and check it is patient-level.

    Scans without an embedding, a label value or a split are dropped and reported, never
    silently imputed. A patient whose scans fall in two splits raises ``PatientLeakageError``.
    """
    # Retrieval fits nothing, so every scan queries and no split is needed.
    is_retrieval = task.category == "retrieval"
    needed = [*task.labels] if is_retrieval else [*task.labels, task.split_column]
    missing_columns = [c for c in needed if c not in labels.columns]
    if missing_columns:
        raise VoxelFMError(f"task {task.name!r}: {source} lacks column(s) {missing_columns}")
    embedded = pd.DataFrame(
        {"scan_id": list(map(str, scan_ids)), "embedding_patient": list(map(str, patient_ids))}
    )
    embedded["embedding_row"] = np.arange(len(embedded))
    table = labels[["scan_id", "patient_id", *needed]].copy()
    if is_retrieval:
        table["split"] = "test"
    else:
        table["split"] = (
            table[task.split_column]
            .astype("string")
            .str.strip()
            .str.lower()
            .replace(_SPLIT_ALIASES)
        )
    merged = table.merge(embedded, on="scan_id", how="left")
    dropped: dict[str, str] = {}
    for scan_id in merged.loc[merged["embedding_row"].isna(), "scan_id"]:
        dropped[scan_id] = "no embedding (failed preprocessing or extraction)"
    merged = merged.dropna(subset=["embedding_row"])
    disagree = merged[merged["patient_id"] != merged["embedding_patient"]]
    if len(disagree):
        first = disagree.iloc[0]
        raise VoxelFMError(
            f"task {task.name!r}: scan {first.scan_id} is patient {first.patient_id!r} in the "
            f"{source} but {first.embedding_patient!r} in the embedding store"
        )
    for scan_id in merged.loc[~merged["split"].isin(SPLITS), "scan_id"]:
        dropped[scan_id] = f"split is not one of {SPLITS}"
    merged = merged[merged["split"].isin(SPLITS)]
    if task.labels:
        incomplete = merged[list(task.labels)].isna().any(axis=1)
        for scan_id in merged.loc[incomplete, "scan_id"]:
            dropped[scan_id] = "missing label value"
        merged = merged[~incomplete]
    check_patient_level_split(merged["patient_id"].to_numpy(), merged["split"].to_numpy())
    merged = merged.sort_values("embedding_row", kind="stable")
    rows = merged[["scan_id", "patient_id", "split", *task.labels]].reset_index(drop=True)
    if not is_retrieval:
        empty = [s for s in SPLITS if not (rows["split"] == s).any()]
        if empty:
            raise VoxelFMError(f"task {task.name!r}: no usable scans in split(s) {empty}")
    return TaskData(rows, merged["embedding_row"].to_numpy(dtype=np.int64), dropped)
