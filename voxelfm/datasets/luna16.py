"""LUNA16 (Setio et al. 2017; luna16.grand-challenge.org): lung nodules in 888 LIDC-IDRI CTs.

Layout expected under ``root``::

    subset0/<seriesuid>.mhd (+ <seriesuid>.raw) ... subset9/...
    annotations.csv    seriesuid, coordX, coordY, coordZ, diameter_mm (one row per nodule)
    candidates.csv     seriesuid, coordX, coordY, coordZ, class (optional, not used)

coordX/Y/Z are world mm in ITK's (LPS) frame, the one the .mhd headers use; this project's
world is RAS, so the adapter writes ``x_ras = -coordX``, ``y_ras = -coordY``,
``z_ras = coordZ``.

Produced: one manifest row per .mhd (``scan_id`` = seriesuid). LUNA16 gives no patient id
(LIDC-IDRI patient numbers are not in the challenge files) and removed repeat series, so
each series is its own patient. Labels: ``nodule_present``, ``n_nodules``,
``nodule_diameter_mm`` and ``nodule_x_mm`` / ``_y_mm`` / ``_z_mm`` (RAS) of the largest
nodule (empty without nodules), ``subset``. Split: the official 10 folds, by default
subsets 0-6 train, 7 val, 8-9 test (option ``subset_splits``: split name -> subsets).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from voxelfm.datasets.common import (
    AdaptedDataset,
    absolute,
    centroid_columns,
    expected,
    lps_to_ras,
    read_table,
    safe_id,
    write_dataset,
)
from voxelfm.errors import InputError
from voxelfm.versions import ADAPTER_VERSIONS

NAME = "luna16"
VERSION = ADAPTER_VERSIONS["luna16"]  # bump it in voxelfm/versions.py

DEFAULT_SUBSET_SPLITS = {"train": (0, 1, 2, 3, 4, 5, 6), "val": (7,), "test": (8, 9)}
_ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
_SUBSET = re.compile(r"^subset(\d+)$")
_EXAMPLE = "subset0/1.3.6.1.4.1.14519.5.2.1.6279.6001.105756658031515062000744821260.mhd"


def adapt(
    root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] | None = None,
    subset_splits: Mapping[str, Sequence[int]] | None = None,
) -> AdaptedDataset:
    """Write the LUNA16 manifest, labels and dataset.json (see the module docstring).

    seed and split_fractions are accepted for a uniform adapter signature but unused: the
    split comes from the official subsets.
    """
    root = Path(root)
    subset_of_split = _check_subset_splits(root, subset_splits or DEFAULT_SUBSET_SPLITS)
    annotations = read_table(
        root / "annotations.csv",
        _ANNOTATION_COLUMNS,
        "the LUNA16 nodule annotations",
        "annotations.csv",
        dtype={"seriesuid": str},
    )
    for column in _ANNOTATION_COLUMNS[1:]:
        annotations[column] = pd.to_numeric(annotations[column], errors="coerce")
        if annotations[column].isna().any():
            raise InputError(root / "annotations.csv", f"column {column} must be numeric")
    subsets = sorted(
        (int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _SUBSET.match(p.name))
    )
    images = [(k, f) for k, folder in subsets for f in sorted(folder.glob("*.mhd"))]
    if not images:
        raise expected(root, "LUNA16 subsets of .mhd scans", _EXAMPLE)

    records = []
    for subset, mhd in images:
        if not _data_file_exists(mhd):
            raise expected(mhd.with_suffix(".raw"), "the .raw named by each .mhd", _EXAMPLE)
        if subset not in subset_of_split:
            raise InputError(root / f"subset{subset}", "is in no split of subset_splits")
        scan_id = safe_id(mhd.stem, mhd, "seriesuid")
        nodules = annotations[annotations["seriesuid"] == scan_id]
        records.append(
            {
                "scan_id": scan_id,
                "patient_id": scan_id,
                "image": absolute(mhd),
                "split": subset_of_split[subset],
                "subset": subset,
                **largest_nodule(nodules),
            }
        )
    labels = pd.DataFrame.from_records(records)
    manifest = labels[["scan_id", "patient_id", "image"]]
    labels = labels.drop(columns="image")
    xyz = centroid_columns("nodule")
    columns = {
        "subset": "official LUNA16 fold (0-9)",
        "nodule_present": "1 = at least one annotated nodule >= 3 mm",
        "n_nodules": "annotated nodules",
        "nodule_diameter_mm": "diameter of the largest nodule",
        **{
            c: f"{axis} of the largest nodule's centre, RAS world mm" for axis, c in zip("xyz", xyz)
        },
    }
    tasks = {
        "luna16_nodule_centre": {
            "category": "localisation",
            "labels": xyz,
            "probes": ["soft_argmax"],
            "options": {"hit_radius_mm": 10},
            "description": "locate the largest lung nodule (scans with a nodule)",
        },
        "luna16_nodule_present": {
            "category": "classification",
            "labels": ["nodule_present"],
            "probes": ["logistic", "knn", "attentive"],
            "description": "any nodule >= 3 mm accepted by 3 of 4 readers",
        },
    }
    return write_dataset(
        out_dir,
        name=NAME,
        version=VERSION,
        root=root,
        manifest=manifest,
        labels=labels,
        columns=columns,
        tasks=tasks,
        split_method="official subsets: "
        + "; ".join(f"{s} = {list(v)}" for s, v in _invert(subset_of_split).items())
        + " (each series is its own patient)",
    )


def largest_nodule(nodules: pd.DataFrame) -> dict[str, float]:
    """Label columns of one scan from its annotation rows (LPS -> RAS for the centre)."""
    x, y, z = centroid_columns("nodule")
    if nodules.empty:
        return {
            "nodule_present": 0,
            "n_nodules": 0,
            "nodule_diameter_mm": np.nan,
            x: np.nan,
            y: np.nan,
            z: np.nan,
        }
    largest = nodules.loc[nodules["diameter_mm"].idxmax()]
    ras = lps_to_ras(largest[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float))
    return {
        "nodule_present": 1,
        "n_nodules": len(nodules),
        "nodule_diameter_mm": float(largest["diameter_mm"]),
        x: ras[0],
        y: ras[1],
        z: ras[2],
    }


def _check_subset_splits(root: Path, subset_splits: Mapping[str, Sequence[int]]) -> dict:
    subset_of_split: dict[int, str] = {}
    for split, subsets in subset_splits.items():
        if split not in ("train", "val", "test"):
            raise InputError(root, f"subset_splits: split {split!r} is not train, val or test")
        for subset in subsets:
            if int(subset) in subset_of_split:
                raise InputError(root, f"subset_splits: subset {subset} is in two splits")
            subset_of_split[int(subset)] = split
    return subset_of_split


def _invert(subset_of_split: Mapping[int, str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for subset, split in sorted(subset_of_split.items()):
        out.setdefault(split, []).append(subset)
    return out


def _data_file_exists(mhd: Path) -> bool:
    """The MetaImage header's ElementDataFile exists (or is LOCAL: data in the header file)."""
    try:
        text = mhd.read_text(errors="replace")[:4096]
    except OSError:
        return False
    match = re.search(r"ElementDataFile\s*=\s*(\S+)", text)
    if match is None:
        return False
    if match[1] == "LOCAL":
        return True
    return (mhd.parent / match[1]).is_file()
