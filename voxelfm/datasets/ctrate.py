"""CT-RATE (Hamamci et al. 2024; huggingface.co/datasets/ibrahimhamamci/CT-RATE): chest CT.

Layout expected under ``root`` (the dataset repository, or its ``dataset/`` folder)::

    dataset/train/train_1/train_1_a/train_1_a_1.nii.gz        (or dataset/train_fixed/...)
    dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz        (or dataset/valid_fixed/...)
    dataset/multi_abnormality_labels/train_predicted_labels.csv     VolumeName + 18 columns
    dataset/multi_abnormality_labels/valid_predicted_labels.csv     (or validation_...)
    dataset/radiology_text_reports/train_reports.csv                VolumeName, Findings_EN,
    dataset/radiology_text_reports/validation_reports.csv           Impressions_EN, ...
    dataset/metadata/train_metadata.csv                             VolumeName, RescaleSlope,
    dataset/metadata/validation_metadata.csv                        RescaleIntercept,
                                                                    XYSpacing, ZSpacing, ...

A volume ``train_12_b_2`` is patient ``train_12``, study ``b``, reconstruction ``2``; the
patient namespaces of train and valid are separate (``valid_12`` is another person).

Produced: one manifest row per volume found on disk (``scan_id`` = VolumeName without
``.nii.gz``) with extra columns ``rescale_slope``, ``rescale_intercept``, ``xy_spacing_mm``,
``z_spacing_mm`` from the metadata CSV. The originally released volumes store raw detector
values with no NIfTI scaling: HU = RescaleSlope * stored + RescaleIntercept must be applied
from the metadata (as CT-CLIP's own loader does). Ingestion applies the manifest's
``rescale_slope`` / ``rescale_intercept`` columns before anything else
(``voxelfm.ingest.manifest.rescale_of``); the spacing columns are recorded for reference.

Labels: the 18 abnormality columns (snake_case, 0/1), ``report`` (Findings_EN),
``impression`` (Impressions_EN), ``study`` (patient + study letter). Split: the official
valid set is ``test`` (as in the paper); the official train set is split by patient into
``train`` / ``val`` in the ratio of split_fractions[0] : split_fractions[1], seeded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from voxelfm.datasets.common import (
    DEFAULT_FRACTIONS,
    AdaptedDataset,
    absolute,
    check_fractions,
    expected,
    first_existing,
    read_table,
    safe_id,
    snake_case,
    two_way_split,
    write_dataset,
)
from voxelfm.errors import InputError
from voxelfm.versions import ADAPTER_VERSIONS

NAME = "ctrate"
VERSION = ADAPTER_VERSIONS["ctrate"]  # bump it in voxelfm/versions.py

ABNORMALITIES = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
LABEL_COLUMNS = tuple(snake_case(a) for a in ABNORMALITIES)

_VOLUME_NAME = re.compile(r"^(?P<patient>(train|valid)_\d+)_(?P<study>[a-z]+)_(?P<recon>\d+)$")
_METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
_REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
# Official split name -> (volume folder names tried in order, CSV name prefixes tried).
_SPLITS = {
    "train": (("train_fixed", "train"), ("train",)),
    "valid": (("valid_fixed", "valid"), ("valid", "validation")),
}


def adapt(
    root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    volumes: str = "auto",
    reconstructions: str = "all",
) -> AdaptedDataset:
    """Write the CT-RATE manifest, labels and dataset.json (see the module docstring).

    volumes: "auto" (``train_fixed``/``valid_fixed`` when present, else ``train``/``valid``),
        "fixed" or "original".
    reconstructions: "all" volumes, or "first" (only ``..._1`` of each study).
    """
    root = Path(root)
    fractions = check_fractions(split_fractions)
    if volumes not in ("auto", "fixed", "original"):
        raise InputError(root, f"volumes must be auto, fixed or original, got {volumes!r}")
    if reconstructions not in ("all", "first"):
        raise InputError(root, f"reconstructions must be all or first, got {reconstructions!r}")
    dataset = root / "dataset" if (root / "dataset").is_dir() else root
    rows = []
    for official in _SPLITS:
        rows.append(_official_split(dataset, official, volumes, reconstructions))
    table = pd.concat(rows, ignore_index=True)

    is_test = table["official_split"] == "valid"
    split = np.full(len(table), "test", dtype=object)
    val_fraction = fractions[1] / (fractions[0] + fractions[1])
    split[~is_test.to_numpy()] = two_way_split(
        table.loc[~is_test, "patient_id"], val_fraction, ("train", "val"), seed
    )
    table["split"] = split

    manifest = table[
        [
            "scan_id",
            "patient_id",
            "image",
            "rescale_slope",
            "rescale_intercept",
            "xy_spacing_mm",
            "z_spacing_mm",
        ]
    ]
    labels = table[
        ["scan_id", "patient_id", "split", "study", *LABEL_COLUMNS, "report", "impression"]
    ]
    columns = {
        "study": "patient and study letter (reconstructions of one acquisition share it)",
        **{
            c: f"{a}: 0/1 from the report classifier (multi_abnormality_labels)"
            for c, a in zip(LABEL_COLUMNS, ABNORMALITIES)
        },
        "report": "Findings_EN of the radiology report",
        "impression": "Impressions_EN of the radiology report",
    }
    tasks = {
        "ctrate_abnormalities": {
            "category": "classification",
            "labels": list(LABEL_COLUMNS),
            "probes": ["logistic", "knn", "attentive"],
            "description": "multi-label classification of the 18 CT-RATE abnormalities",
        },
        "ctrate_report": {
            "category": "report_generation",
            "labels": ["report"],
            "probes": ["decoder", "nearest_neighbour"],
            "description": "findings-section generation",
        },
        "ctrate_retrieval": {
            "category": "retrieval",
            "probes": ["gallery", "pool"],
            "description": "find the other volumes (reconstructions, studies) of the patient",
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
        split_method=(
            "official valid set -> test; official train set split by patient into train/val "
            f"{fractions[0]}:{fractions[1]} (seed {seed})"
        ),
        extra={
            "manifest_columns": {
                "rescale_slope": "HU = rescale_slope * stored + rescale_intercept (metadata CSV)",
                "rescale_intercept": "see rescale_slope",
                "xy_spacing_mm": "in-plane spacing from the metadata CSV",
                "z_spacing_mm": "slice spacing from the metadata CSV",
            },
            "options": {"volumes": volumes, "reconstructions": reconstructions},
        },
    )


def _official_split(dataset: Path, official: str, volumes: str, reconstructions: str):
    folders, prefixes = _SPLITS[official]
    if volumes == "fixed":
        folders = folders[:1]
    elif volumes == "original":
        folders = folders[1:]
    example = f"dataset/{folders[-1]}/{official}_1/{official}_1_a/{official}_1_a_1.nii.gz"
    volume_dir = first_existing([dataset / f for f in folders], "CT-RATE volumes", example)
    files = sorted(volume_dir.glob(f"{official}_*/{official}_*/{official}_*.nii.gz"))
    if not files:
        raise expected(volume_dir, "CT-RATE volumes", example)

    def csv(folder: str, suffix: str, what: str, columns) -> pd.DataFrame:
        candidates = [dataset / folder / f"{p}_{suffix}" for p in prefixes]
        path = first_existing(candidates, what, f"dataset/{folder}/{prefixes[0]}_{suffix}")
        table = read_table(path, columns, what, f"dataset/{folder}/{prefixes[0]}_{suffix}")
        return table.drop_duplicates("VolumeName").set_index("VolumeName")

    abnormal = csv(
        "multi_abnormality_labels",
        "predicted_labels.csv",
        "CT-RATE abnormality labels",
        ("VolumeName", *ABNORMALITIES),
    )
    reports = csv("radiology_text_reports", "reports.csv", "CT-RATE reports", _REPORT_COLUMNS)
    metadata = csv("metadata", "metadata.csv", "CT-RATE metadata", _METADATA_COLUMNS)

    records = []
    for file in files:
        volume_name = file.name
        scan_id = safe_id(volume_name[: -len(".nii.gz")], file, "volume name")
        match = _VOLUME_NAME.match(scan_id)
        if match is None:
            raise expected(file, "a CT-RATE volume name", f"{official}_1_a_1.nii.gz")
        if reconstructions == "first" and match["recon"] != "1":
            continue
        if volume_name not in metadata.index:
            raise expected(
                dataset / "metadata", f"a metadata row for {volume_name}", "train_metadata.csv"
            )
        meta = metadata.loc[volume_name]
        record = {
            "scan_id": scan_id,
            "patient_id": match["patient"],
            "study": f"{match['patient']}_{match['study']}",
            "image": absolute(file),
            "official_split": official,
            "rescale_slope": float(meta["RescaleSlope"]),
            "rescale_intercept": float(meta["RescaleIntercept"]),
            "xy_spacing_mm": _first_number(meta["XYSpacing"]),
            "z_spacing_mm": float(meta["ZSpacing"]),
        }
        if volume_name in abnormal.index:
            values = abnormal.loc[volume_name, list(ABNORMALITIES)]
            record.update({c: values[a] for c, a in zip(LABEL_COLUMNS, ABNORMALITIES)})
        if volume_name in reports.index:
            record["report"] = reports.loc[volume_name, "Findings_EN"]
            record["impression"] = reports.loc[volume_name, "Impressions_EN"]
        records.append(record)
    table = pd.DataFrame.from_records(records)
    for column in (*LABEL_COLUMNS, "report", "impression"):
        if column not in table:
            table[column] = np.nan
    for column in LABEL_COLUMNS:
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    return table


def _first_number(text) -> float:
    """'[0.75, 0.75]' (how the metadata CSV writes XYSpacing) -> 0.75."""
    numbers = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(text))
    return float(numbers[0]) if numbers else float("nan")
