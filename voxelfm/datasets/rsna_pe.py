"""RSNA STR Pulmonary Embolism Detection (Kaggle 2020, rsna-str-pulmonary-embolism-detection).

Layout expected under ``root`` (the competition download)::

    train.csv       StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
                    pe_present_on_image, negative_exam_for_pe, indeterminate,
                    rv_lv_ratio_gte_1, rv_lv_ratio_lt_1, leftsided_pe, rightsided_pe,
                    central_pe, chronic_pe, acute_and_chronic_pe, ... (one row per image)
    train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Produced: one manifest row per series folder listed in train.csv and present on disk
(``scan_id`` = SeriesInstanceUID, ``image`` = the series folder). No patient id is public:
each study is treated as its own patient (``patient_id`` = StudyInstanceUID), so a person
scanned twice could sit in two splits -- an unavoidable limit of the public data.

Labels (study level; the exam-level columns are constant over a study's rows, checked):
``pe_present`` = 1 - negative_exam_for_pe for determinate exams and empty for the
indeterminate ones (which are neither positive nor negative), checked against
max(pe_present_on_image); ``indeterminate``; ``rv_lv_ratio_gte_1``, ``central_pe``,
``leftsided_pe``, ``rightsided_pe``, ``chronic_pe``, ``acute_and_chronic_pe`` (given only
for PE-positive studies, empty otherwise); ``n_images``. Split: seeded patient-level
(= study-level) split stratified by pe_present.
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

NAME = "rsna_pe"
VERSION = ADAPTER_VERSIONS["rsna_pe"]  # bump it in voxelfm/versions.py

_ID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_EXAM_COLUMNS = ("negative_exam_for_pe", "indeterminate")
# Exam-level findings that describe a PE: meaningful only when one is present.
POSITIVE_ONLY = (
    "rv_lv_ratio_gte_1",
    "central_pe",
    "leftsided_pe",
    "rightsided_pe",
    "chronic_pe",
    "acute_and_chronic_pe",
)
_EXAMPLE = "train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm"


def adapt(
    root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> AdaptedDataset:
    """Write the RSNA-PE manifest, labels and dataset.json (see the module docstring)."""
    root = Path(root)
    csv_path = root / "train.csv"
    table = read_table(
        csv_path,
        (*_ID_COLUMNS, "pe_present_on_image", *_EXAM_COLUMNS, *POSITIVE_ONLY),
        "the RSNA-PE image table",
        "train.csv",
        dtype={c: str for c in _ID_COLUMNS},
    )
    image_dir = require_dir(root / "train", "the RSNA-PE DICOM folder", _EXAMPLE)
    exam_columns = (*_EXAM_COLUMNS, *POSITIVE_ONLY)
    for column in ("pe_present_on_image", *exam_columns):
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any() or not values.isin((0, 1)).all():
            raise InputError(csv_path, f"column {column} must hold only 0 and 1")
        table[column] = values.astype(int)

    by_series = table.groupby("SeriesInstanceUID", sort=True)
    varying = by_series[["StudyInstanceUID", *exam_columns]].nunique().max()
    if (varying > 1).any():
        column = varying[varying > 1].index[0]
        raise InputError(csv_path, f"column {column} differs between rows of one series")
    series = by_series.agg(
        study=("StudyInstanceUID", "first"),
        n_images=("SOPInstanceUID", "size"),
        any_pe_image=("pe_present_on_image", "max"),
        **{c: (c, "first") for c in exam_columns},
    ).reset_index()

    records = []
    for row in series.itertuples(index=False):
        folder = image_dir / row.study / row.SeriesInstanceUID
        if not folder.is_dir() or not any(folder.glob("*.dcm")):
            continue  # listed but not downloaded: the manifest covers what is on disk
        determinate = row.indeterminate == 0
        pe_present = (1 - row.negative_exam_for_pe) if determinate else np.nan
        if determinate and pe_present != row.any_pe_image:
            raise InputError(
                csv_path,
                f"series {row.SeriesInstanceUID}: negative_exam_for_pe={row.negative_exam_for_pe}"
                f" but max(pe_present_on_image)={row.any_pe_image}",
            )
        records.append(
            {
                "scan_id": safe_id(row.SeriesInstanceUID, csv_path, "SeriesInstanceUID"),
                "patient_id": safe_id(row.study, csv_path, "StudyInstanceUID"),
                "image": absolute(folder),
                "pe_present": pe_present,
                "indeterminate": row.indeterminate,
                **{c: getattr(row, c) if pe_present == 1 else np.nan for c in POSITIVE_ONLY},
                "n_images": row.n_images,
            }
        )
    if not records:
        raise expected(image_dir, "DICOM series of the studies in train.csv", _EXAMPLE)
    labels = pd.DataFrame.from_records(records)
    for column in ("pe_present", *POSITIVE_ONLY):
        labels[column] = labels[column].astype("Int64")
    split, method = seeded_split(
        labels["patient_id"], split_fractions, seed, stratify=labels["pe_present"]
    )
    labels.insert(2, "split", split)
    manifest = labels[["scan_id", "patient_id", "image"]]
    labels = labels.drop(columns="image")
    columns = {
        "pe_present": "1 = PE on the exam, 0 = negative exam, empty = indeterminate exam",
        "indeterminate": "1 = the exam was read as indeterminate (QA or contrast problem)",
        **{c: f"{c} (RSNA exam label), given for PE-positive exams only" for c in POSITIVE_ONLY},
        "n_images": "rows of train.csv (images) in the series",
    }
    tasks = {
        "rsna_pe_present": {
            "category": "classification",
            "labels": ["pe_present"],
            "probes": ["logistic", "knn", "attentive"],
            "description": "pulmonary embolism present on the CT pulmonary angiogram",
        },
        "rsna_pe_rv_lv": {
            "category": "classification",
            "labels": ["rv_lv_ratio_gte_1"],
            "probes": ["logistic", "knn"],
            "description": "right-heart strain (RV/LV >= 1) among PE-positive exams",
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
        split_method=method + "; patient = study (no public patient id)",
        extra={"n_series_listed": len(series)},
    )
