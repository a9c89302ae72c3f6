"""OSIC Pulmonary Fibrosis Progression (Kaggle 2020, osic-pulmonary-fibrosis-progression).

Layout expected under ``root`` (the competition download)::

    train.csv                    Patient, Weeks, FVC, Percent, Age, Sex, SmokingStatus
                                 (one row per spirometry visit)
    train/<Patient>/<n>.dcm      the patient's baseline chest CT, one file per slice

Produced: one manifest row per patient with a CT folder (``image`` = ``train/<Patient>``).
Labels (per patient, from its visits):

- ``fvc_baseline_ml``: the FVC of the visit closest to week 0 (the CT), the earlier one on
  a tie; ``percent_baseline`` is that visit's percent of predicted FVC;
- ``fvc_slope_ml_per_week``: least-squares slope of FVC over Weeks using every visit
  (empty with fewer than two distinct weeks) -- the decline the competition forecasts;
- ``age``, ``sex``, ``smoking_status``, ``n_visits``.

Split: seeded patient-level split (no official test labels exist; the Kaggle ``test/``
folder holds five training patients and is ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from voxelfm.datasets.common import (
    DEFAULT_FRACTIONS,
    AdaptedDataset,
    absolute,
    expected,
    read_table,
    require_dir,
    safe_id,
    seeded_split,
    write_dataset,
)
from voxelfm.errors import InputError
from voxelfm.versions import ADAPTER_VERSIONS

NAME = "osic"
VERSION = ADAPTER_VERSIONS["osic"]  # bump it in voxelfm/versions.py

_COLUMNS = ("Patient", "Weeks", "FVC", "Percent", "Age", "Sex", "SmokingStatus")
_EXAMPLE = "train/ID00007637202177411956430/1.dcm"


def adapt(
    root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> AdaptedDataset:
    """Write the OSIC manifest, labels and dataset.json (see the module docstring)."""
    root = Path(root)
    csv_path = root / "train.csv"
    visits = read_table(
        csv_path, _COLUMNS, "the OSIC visit table", "train.csv", dtype={"Patient": str}
    )
    for column in ("Weeks", "FVC", "Percent"):
        visits[column] = pd.to_numeric(visits[column], errors="coerce")
        if visits[column].isna().any():
            raise InputError(csv_path, f"column {column} must be numeric in every row")
    image_dir = require_dir(root / "train", "the OSIC DICOM folder", _EXAMPLE)

    records = []
    for patient, group in visits.groupby("Patient", sort=True):
        folder = image_dir / patient
        if not folder.is_dir() or not any(folder.glob("*.dcm")):
            continue
        records.append(
            {
                "scan_id": safe_id(patient, csv_path, "Patient"),
                "patient_id": patient,
                "image": absolute(folder),
                **visit_targets(
                    group["Weeks"].to_numpy(), group["FVC"].to_numpy(), group["Percent"].to_numpy()
                ),
                "age": group["Age"].iloc[0],
                "sex": group["Sex"].iloc[0],
                "smoking_status": group["SmokingStatus"].iloc[0],
            }
        )
    if not records:
        raise expected(image_dir, "DICOM folders of the patients in train.csv", _EXAMPLE)
    labels = pd.DataFrame.from_records(records)
    split, method = seeded_split(labels["patient_id"], split_fractions, seed)
    labels.insert(2, "split", split)
    manifest = labels[["scan_id", "patient_id", "image"]]
    labels = labels.drop(columns="image")
    columns = {
        "fvc_baseline_ml": "FVC (ml) at the visit closest to week 0 (the CT)",
        "percent_baseline": "percent of predicted FVC at that visit",
        "fvc_slope_ml_per_week": "least-squares slope of FVC over weeks (all visits)",
        "n_visits": "spirometry visits in train.csv",
        "age": "age in years",
        "sex": "Male / Female",
        "smoking_status": "Never smoked / Ex-smoker / Currently smokes",
    }
    tasks = {
        "osic_fvc_baseline": {
            "category": "regression",
            "labels": ["fvc_baseline_ml"],
            "probes": ["ridge", "mlp"],
            "description": "lung function (FVC) at the time of the CT",
        },
        "osic_fvc_slope": {
            "category": "regression",
            "labels": ["fvc_slope_ml_per_week"],
            "probes": ["ridge", "mlp"],
            "description": "FVC decline per week (fibrosis progression)",
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
        split_method=method,
    )


def visit_targets(weeks: np.ndarray, fvc: np.ndarray, percent: np.ndarray) -> dict[str, float]:
    """Baseline FVC / percent (visit closest to week 0, earlier on a tie) and the FVC slope.

    weeks, fvc, percent: (n_visits,) arrays of one patient.
    """
    weeks, fvc, percent = (np.asarray(a, dtype=float) for a in (weeks, fvc, percent))
    # lexsort: last key is primary -> smallest |week|, then the earlier week.
    baseline = np.lexsort((weeks, np.abs(weeks)))[0]
    slope = float(np.polyfit(weeks, fvc, 1)[0]) if len(np.unique(weeks)) >= 2 else np.nan
    return {
        "fvc_baseline_ml": float(fvc[baseline]),
        "percent_baseline": float(percent[baseline]),
        "fvc_slope_ml_per_week": slope,
        "n_visits": len(weeks),
    }
