"""NSCLC-Radiomics "Lung1" (Aerts et al. 2014; TCIA doi:10.7937/K9/TCIA.2015.PF0M9REI).

Layout expected under ``root`` (a TCIA download folder)::

    NSCLC-Radiomics/LUNG1-001/<study>/<series>/*.dcm     (CT, RTSTRUCT and SEG series)
    NSCLC-Radiomics-Lung1.clinical-version3-Oct-2019.csv  PatientID, age, clinical.T.Stage,
                                                          Clinical.N.Stage, Clinical.M.Stage,
                                                          Overall.Stage, Histology, gender,
                                                          Survival.time, deadstatus.event

``root`` may also be the ``NSCLC-Radiomics`` folder itself; the clinical CSV is looked for
in ``root`` and its parent (or given with the ``clinical_csv`` option). Study and series
folder names can be TCIA's descriptive names or UIDs: every folder holding ``.dcm`` files
is a series, and its modality is read from one header.

Produced: one manifest row per patient, ``image`` = its CT series folder (the one with
the most slices when there are several CT series; RTSTRUCT / SEG / RTDOSE are skipped).
Labels: ``survival_time_days`` (Survival.time), ``event`` (deadstatus.event, 1 = died),
``age``, ``gender``, ``overall_stage``, ``histology``, ``t_stage``. Split: seeded
patient-level split stratified by the event.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from voxelfm.datasets.common import (
    DEFAULT_FRACTIONS,
    AdaptedDataset,
    absolute,
    expected,
    first_existing,
    read_table,
    safe_id,
    seeded_split,
    write_dataset,
)
from voxelfm.errors import InputError
from voxelfm.versions import ADAPTER_VERSIONS

NAME = "nsclc_radiomics"
VERSION = ADAPTER_VERSIONS["nsclc_radiomics"]  # bump it in voxelfm/versions.py

CLINICAL_CSV = "NSCLC-Radiomics-Lung1.clinical-version3-Oct-2019.csv"
_COLUMNS = ("PatientID", "Survival.time", "deadstatus.event")
_OPTIONAL = {
    "age": "age",
    "gender": "gender",
    "Overall.Stage": "overall_stage",
    "Histology": "histology",
    "clinical.T.Stage": "t_stage",
}
_EXAMPLE = "NSCLC-Radiomics/LUNG1-001/<study>/<series>/1-001.dcm"


def adapt(
    root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    clinical_csv: str | None = None,
) -> AdaptedDataset:
    """Write the NSCLC-Radiomics manifest, labels and dataset.json (module docstring)."""
    root = Path(root)
    collection = root / "NSCLC-Radiomics" if (root / "NSCLC-Radiomics").is_dir() else root
    csv_path = (
        Path(clinical_csv)
        if clinical_csv
        else first_existing(
            [root / CLINICAL_CSV, collection / CLINICAL_CSV, root.parent / CLINICAL_CSV],
            "the Lung1 clinical CSV",
            CLINICAL_CSV,
        )
    )
    clinical = read_table(
        csv_path, _COLUMNS, "the Lung1 clinical CSV", CLINICAL_CSV, dtype={"PatientID": str}
    )
    clinical["PatientID"] = clinical["PatientID"].str.strip()
    clinical = clinical.drop_duplicates("PatientID").set_index("PatientID")
    patients = sorted(p for p in collection.glob("LUNG1-*") if p.is_dir())
    if not patients:
        raise expected(collection, "Lung1 patient folders", _EXAMPLE)

    records, skipped = [], {}
    for patient in patients:
        patient_id = safe_id(patient.name, patient, "patient folder")
        if patient_id not in clinical.index:
            skipped[patient_id] = "not in the clinical CSV"
            continue
        ct = _ct_series(patient)
        if ct is None:
            skipped[patient_id] = "no CT series"
            continue
        row = clinical.loc[patient_id]
        records.append(
            {
                "scan_id": patient_id,
                "patient_id": patient_id,
                "image": absolute(ct),
                "survival_time_days": pd.to_numeric(row["Survival.time"], errors="coerce"),
                "event": pd.to_numeric(row["deadstatus.event"], errors="coerce"),
                **{new: row.get(old) for old, new in _OPTIONAL.items()},
            }
        )
    if not records:
        raise expected(collection, "Lung1 patients with a CT series in the clinical CSV", _EXAMPLE)
    labels = pd.DataFrame.from_records(records)
    labels["event"] = labels["event"].astype("Int64")
    split, method = seeded_split(
        labels["patient_id"], split_fractions, seed, stratify=labels["event"]
    )
    labels.insert(2, "split", split)
    manifest = labels[["scan_id", "patient_id", "image"]]
    labels = labels.drop(columns="image")
    columns = {
        "survival_time_days": "overall survival or follow-up time in days (Survival.time)",
        "event": "1 = died (deadstatus.event), 0 = censored",
        "age": "age at diagnosis in years",
        "gender": "male / female",
        "overall_stage": "overall stage (I, II, IIIa, IIIb)",
        "histology": "histology (adenocarcinoma, squamous cell carcinoma, large cell, nos)",
        "t_stage": "clinical T stage",
    }
    tasks = {
        "nsclc_survival": {
            "category": "survival",
            "labels": ["survival_time_days", "event"],
            "probes": ["cox", "mlp_cox"],
            "description": "overall survival of NSCLC patients from the planning CT",
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
        extra={"skipped_patients": skipped, "clinical_csv": str(csv_path)},
    )


def _ct_series(patient: Path) -> Path | None:
    """The folder of the patient's CT series with the most files (None if there is none)."""
    best, best_count = None, 0
    for folder, _, names in sorted(os.walk(patient)):
        dicoms = sorted(n for n in names if n.lower().endswith(".dcm"))
        if not dicoms or len(dicoms) <= best_count:
            continue
        if _modality(Path(folder) / dicoms[0]) == "CT":
            best, best_count = Path(folder), len(dicoms)
    return best


def _modality(file: Path) -> str:
    try:
        header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, EOFError, ValueError) as error:
        raise InputError(file, f"unreadable DICOM header: {error}") from None
    return str(header.get("Modality", ""))
