"""What every dataset adapter shares: layout checks, splits, label-map geometry, the writer.

An adapter turns a public dataset's own layout on disk into this project's inputs::

    out_dir/manifest.csv     scan_id, patient_id, image (+ label_<name>, extra columns)
    out_dir/labels.csv       scan_id, patient_id, split, label columns (one row per scan)
    out_dir/dataset.json     adapter, version, root, counts, column descriptions, tasks

``dataset.json`` is written last, so a folder holding it is complete. Every file is written
atomically, and the manifest is validated (``read_manifest(strict=True)``) before it is put
in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.evaluation.tasks import EvaluationTask
from voxelfm.ingest.manifest import read_manifest
from voxelfm.splits import check_patient_level_split, make_patient_split, patient_strata
from voxelfm.utils.atomic import atomic_path, atomic_write_text, write_csv_atomically
from voxelfm.utils.jsonable import to_jsonable

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
SPLITS = ("train", "val", "test")
INFO_FILE = "dataset.json"  # written last: its presence marks a finished folder


@dataclass(frozen=True)
class AdaptedDataset:
    """What an adapter wrote.

    Attributes:
        name: adapter name (a key of ``voxelfm.datasets.ADAPTERS``).
        out_dir: the output folder.
        manifest: ``out_dir/manifest.csv``.
        labels: ``out_dir/labels.csv``.
        info: ``out_dir/dataset.json``.
        n_scans, n_patients: rows of the manifest and distinct patients.
        tasks: suggested task configs (usable under ``evaluation.tasks``).
    """

    name: str
    out_dir: Path
    manifest: Path
    labels: Path
    info: Path
    n_scans: int
    n_patients: int
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)


# --- layout checks -------------------------------------------------------------------------


def expected(path: str | os.PathLike, what: str, example: str) -> InputError:
    """The one-line error for a missing or malformed piece of a dataset's layout."""
    return InputError(path, f"expected {what} (e.g. {example})")


def require_dir(path: Path, what: str, example: str) -> Path:
    if not path.is_dir():
        raise expected(path, what, example)
    return path


def require_file(path: Path, what: str, example: str) -> Path:
    if not path.is_file():
        raise expected(path, what, example)
    return path


def first_existing(candidates: Sequence[Path], what: str, example: str) -> Path:
    """The first path of ``candidates`` that exists; else the error names the first one."""
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise expected(candidates[0], what, example)


def read_table(
    path: Path,
    columns: Iterable[str],
    what: str,
    example: str,
    *,
    sep: str = ",",
    dtype: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """A CSV with at least ``columns`` (whitespace around header names is ignored)."""
    require_file(path, what, example)
    try:
        table = pd.read_csv(path, sep=sep, dtype=dtype, keep_default_na=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(path, f"cannot read {what}: {' '.join(str(err).split())}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise expected(
            path,
            f"{what} with column(s) {', '.join(missing)}",
            f"header {sep.join(columns)}",
        )
    if table.empty:
        raise expected(path, f"{what} with at least one row", example)
    return table


def safe_id(value: str, path: Path, what: str) -> str:
    """``value`` if it can be a scan id; a dataset with odd names is refused, not renamed."""
    from voxelfm.store.layout import SAFE_NAME_RULE, is_safe_name

    value = str(value).strip()
    if not is_safe_name(value):
        raise InputError(path, f"{what} {value!r} {SAFE_NAME_RULE}")
    return value


def absolute(path: str | os.PathLike) -> str:
    """An absolute path that keeps the user's symlinks (as ``read_manifest`` records paths)."""
    return os.path.abspath(path)


def snake_case(name: str) -> str:
    """'Lung nodule' -> 'lung_nodule', 'SpinalCord' -> 'spinal_cord'."""
    out = []
    for k, char in enumerate(name.strip()):
        if char.isupper() and k and (name[k - 1].islower() or name[k - 1].isdigit()):
            out.append("_")
        out.append(char.lower() if char.isalnum() else "_")
    return "_".join(part for part in "".join(out).split("_") if part)


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """A list option given as a Python list or as 'a,b,c' (from the command line)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return [str(item) for item in value]


# --- splits --------------------------------------------------------------------------------


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) <= 0 or not np.isclose(sum(fractions), 1.0):
        raise VoxelFMError(
            f"split_fractions must be three positive numbers summing to 1: {fractions}"
        )
    return fractions  # type: ignore[return-value]


def seeded_split(
    patient_ids: Sequence,
    fractions: Sequence[float],
    seed: int,
    stratify: Sequence | None = None,
) -> tuple[np.ndarray, str]:
    """Patient-level train/val/test per scan, and how it was drawn (for dataset.json).

    Stratified by ``stratify`` (per scan; a patient's stratum is its most frequent value)
    when every stratum is large enough, otherwise unstratified rather than failing: a small
    or very unbalanced cohort still gets a split.
    """
    fractions = check_fractions(fractions)
    if stratify is not None:
        try:
            split = make_patient_split(
                patient_ids, fractions, seed, stratify=_strata_text(stratify).to_numpy()
            )
            return split, f"seeded patient-level split {fractions}, stratified (seed {seed})"
        except VoxelFMError:
            pass
    split = make_patient_split(patient_ids, fractions, seed)
    return split, f"seeded patient-level split {fractions} (seed {seed})"


def _strata_text(stratify: Sequence) -> pd.Series:
    """Strata as text, a missing value being its own stratum ("missing")."""
    values = pd.Series(list(stratify), dtype=object)
    return values.where(values.notna(), "missing").astype(str)


def two_way_split(
    patient_ids: Sequence,
    second_fraction: float,
    names: tuple[str, str],
    seed: int,
    stratify: Sequence | None = None,
) -> np.ndarray:
    """Split patients in two (e.g. an official training set into train / val) per scan.

    ``second_fraction`` of the patients get ``names[1]``; stratified when possible.
    """
    patient_ids = np.asarray(patient_ids, dtype=object)
    patients = np.unique(patient_ids)
    if len(patients) < 2:
        return np.full(len(patient_ids), names[0], dtype=object)
    strata = None
    if stratify is not None:
        by_patient = patient_strata(patient_ids, _strata_text(stratify))
        strata = by_patient.loc[patients].to_numpy()
    n_second = max(1, round(second_fraction * len(patients)))
    n_second = min(n_second, len(patients) - 1)
    try:
        _, second = train_test_split(
            patients, test_size=n_second, random_state=seed, stratify=strata
        )
    except ValueError:  # a stratum too small: fall back to an unstratified draw
        _, second = train_test_split(patients, test_size=n_second, random_state=seed)
    second = set(second)
    return np.array([names[1] if p in second else names[0] for p in patient_ids], dtype=object)


# --- label-map geometry --------------------------------------------------------------------


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml from a 4x4 voxel -> mm affine."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def label_statistics(
    label_map: np.ndarray, affine: np.ndarray, values: Sequence[int]
) -> dict[int, tuple[np.ndarray | None, float]]:
    """Per label value: (centroid in world mm, volume in ml); centroid None when absent.

    label_map: (I, J, K) non-negative integer array; affine: its 4x4 voxel index -> world mm
    affine (a nibabel affine gives RAS mm). The centroid is the mean voxel index mapped
    through the affine (an affine map commutes with the mean).
    """
    values = [int(v) for v in values]
    if min(values, default=1) < 1:
        raise ValueError("label_statistics: values must be >= 1 (0 is background)")
    label_map = np.asarray(label_map)
    if label_map.ndim == 4 and label_map.shape[3] == 1:  # NIfTI (I, J, K, 1)
        label_map = label_map[..., 0]
    # Only labelled voxels: organs are a small part of a scan, so this is a few ms per map.
    indices = np.nonzero(label_map)
    labelled = label_map[indices].astype(np.intp)
    size = max(int(labelled.max(initial=0)), *values) + 1
    counts = np.bincount(labelled, minlength=size)
    index_sums = np.stack(
        [np.bincount(labelled, weights=axis_index, minlength=size) for axis_index in indices]
    )  # (3, size)
    affine = np.asarray(affine, dtype=float)
    ml = voxel_volume_ml(affine)
    stats: dict[int, tuple[np.ndarray | None, float]] = {}
    for value in values:
        if counts[value] == 0:
            stats[value] = (None, 0.0)
            continue
        index = index_sums[:, value] / counts[value]
        stats[value] = (affine[:3, :3] @ index + affine[:3, 3], float(counts[value]) * ml)
    return stats


def centroid_columns(prefix: str) -> list[str]:
    return [f"{prefix}_x_mm", f"{prefix}_y_mm", f"{prefix}_z_mm"]


def lps_to_ras(xyz: Sequence[float]) -> np.ndarray:
    """World mm LPS (ITK, DICOM, LUNA16 annotations) -> RAS (ours): negate x and y."""
    x, y, z = (float(v) for v in xyz)
    return np.array([-x, -y, z])


# --- writing -------------------------------------------------------------------------------


def check_tasks(tasks: Mapping[str, Mapping[str, Any]], labels: pd.DataFrame) -> None:
    """Every suggested task parses as a EvaluationTask and names columns the label table has."""
    for name, config in tasks.items():
        task = EvaluationTask.from_config(name, config)
        missing = [c for c in task.labels if c not in labels.columns]
        if missing:
            raise VoxelFMError(f"suggested task {name!r} names missing column(s) {missing}")


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    name: str,
    version: int,
    root: Path,
    manifest: pd.DataFrame,
    labels: pd.DataFrame,
    columns: Mapping[str, str],
    tasks: Mapping[str, Mapping[str, Any]],
    split_method: str,
    extra: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> AdaptedDataset:
    """Validate and write manifest.csv, labels.csv, any extra text files, then dataset.json.

    columns: label-table column -> description (every label column must be described).
    extra_files: file name -> text (e.g. label_names.json), written before dataset.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if manifest.empty:
        raise InputError(root, "no usable scans were found in the dataset's layout")
    if list(manifest["scan_id"]) != list(labels["scan_id"]):
        raise VoxelFMError("internal: manifest and label table rows differ")  # a bug, not input
    check_patient_level_split(labels["patient_id"].to_numpy(), labels["split"].to_numpy())
    bad_split = sorted(set(labels["split"]) - set(SPLITS))
    if bad_split:
        raise VoxelFMError(f"internal: split values {bad_split} are not {SPLITS}")
    undescribed = [
        c for c in labels.columns if c not in ("scan_id", "patient_id", "split", *columns)
    ]
    if undescribed:
        raise VoxelFMError(f"internal: label column(s) {undescribed} lack a description")
    check_tasks(tasks, labels)

    manifest_path = out_dir / "manifest.csv"
    # Validate the manifest as the pipeline will read it, from its final folder (relative
    # label paths resolve there), before it replaces any earlier one.
    with atomic_path(manifest_path) as tmp:
        manifest.to_csv(tmp, index=False)
        read_manifest(tmp, strict=True)
    labels_path = write_csv_atomically(labels, out_dir / "labels.csv")
    for file_name, text in (extra_files or {}).items():
        atomic_write_text(out_dir / file_name, text)
    split_counts = labels["split"].value_counts().reindex(SPLITS, fill_value=0)
    info = {
        "adapter": name,
        "version": version,
        "root": absolute(Path(root)),
        "counts": {
            "scans": len(manifest),
            "patients": int(manifest["patient_id"].nunique()),
            "scans_per_split": {k: int(v) for k, v in split_counts.items()},
            "patients_per_split": {
                s: int(labels.loc[labels["split"] == s, "patient_id"].nunique()) for s in SPLITS
            },
        },
        "split": split_method,
        "columns": dict(columns),
        "tasks": {k: dict(v) for k, v in tasks.items()},
        **(extra or {}),
    }
    info_path = out_dir / INFO_FILE
    atomic_write_text(info_path, json.dumps(to_jsonable(info), indent=2) + "\n")
    return AdaptedDataset(
        name=name,
        out_dir=out_dir,
        manifest=manifest_path,
        labels=labels_path,
        info=info_path,
        n_scans=len(manifest),
        n_patients=int(manifest["patient_id"].nunique()),
        tasks={k: dict(v) for k, v in tasks.items()},
    )
