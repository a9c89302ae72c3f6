"""The project's real CT folder (``../shared/data``; its README.md describes the sources).

Layout expected under ``root``::

    openkbp/patients.csv                 patient_id, split (train / validation), spacing_mm,
                                         has_dose, <Organ>_ml, <Organ>_mean_dose_gy, PTV56_ml,
                                         PTV63_ml, PTV70_ml
    openkbp/<patient_id>/ct.nii.gz, oars.nii.gz, ptv.nii.gz
    ibsi_sts/STS_001/ct.nii.gz, gtv.nii.gz
    totalseg/example_ct.nii.gz, example_seg_fast_force_split.nii.gz, classes.csv (label,name)
    totalseg/example_ct_dicom/ (DICOM series), example_seg_dicom.nii.gz
    dicom/slicer_head_ct/, dicom/dcmqi_abdomen_3slice/  (DICOM series)

Every cohort folder but ``openkbp`` is optional (a cohort that is absent is skipped).

Produced: a manifest of every CT volume (OpenKBP with ``label_oars`` and ``label_ptv``,
IBSI with ``label_gtv``, the TotalSegmentator examples with ``label_organs``, the DICOM
series without labels) and labels.csv with, per scan:

- ``cohort``: openkbp / ibsi / totalseg / dicom;
- ``<organ>_x_mm`` / ``_y_mm`` / ``_z_mm`` for the 7 OpenKBP organs (brainstem,
  spinal_cord, right_parotid, left_parotid, esophagus, larynx, mandible): centroid of the
  organ's voxels in RAS world mm from the label map's nibabel affine, empty when absent;
- ``ptv63_present``: 1 when the PTV label map holds PTV63 voxels (value 2);
- ``ptv70_volume_ml``: PTV70 (value 3, which wins overlaps, so it is complete) in ml;
- ``parotid_mean_dose_gy``: mean of RightParotid_mean_dose_gy and LeftParotid_mean_dose_gy
  of patients.csv (the one available when only one is; empty without a dose);
- ``gtv_volume_ml``: IBSI tumour volume in ml from gtv.nii.gz.

Re-identification copies (option ``reidentification_copies``, default 0): for every OpenKBP
and IBSI scan, that many derived scans of the same patient are written to
``out_dir/derived/<scan_id>_copy<k>.nii.gz``: a random sub-volume (each axis keeps 70-90%
of its extent at a random offset) with Gaussian noise (sigma 10-40 HU), seeded by (seed,
scan id, k). They carry no label values (so no other task sees them twice) and inherit their
patient's split; the instance-retrieval task asks whether a backbone finds the original
among all scans from a copy, and vice versa.

Split (every scan is its own patient here): OpenKBP ``validation`` patients are ``val``;
OpenKBP ``train`` patients are split by a seeded draw into ``train`` and ``test`` in the
ratio split_fractions[0] : split_fractions[2]; the other cohorts together get a seeded
patient-level split by split_fractions.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from voxelfm.datasets.common import (
    DEFAULT_FRACTIONS,
    AdaptedDataset,
    absolute,
    centroid_columns,
    check_fractions,
    expected,
    label_statistics,
    read_table,
    require_dir,
    require_file,
    seeded_split,
    snake_case,
    two_way_split,
    write_dataset,
)
from voxelfm.errors import VoxelFMError
from voxelfm.utils.atomic import atomic_path
from voxelfm.versions import ADAPTER_VERSIONS

NAME = "shared_ct"
VERSION = ADAPTER_VERSIONS["shared_ct"]  # bump it in voxelfm/versions.py

OPENKBP_ORGANS = (
    "Brainstem",
    "SpinalCord",
    "RightParotid",
    "LeftParotid",
    "Esophagus",
    "Larynx",
    "Mandible",
)  # value k + 1 in oars.nii.gz
PTV_LEVELS = ("PTV56", "PTV63", "PTV70")  # values 1, 2, 3 in ptv.nii.gz
ORGAN_COLUMNS = {organ: snake_case(organ) for organ in OPENKBP_ORGANS}
COHORTS = ("openkbp", "ibsi", "totalseg", "dicom")
VALUE_COLUMNS = ("ptv63_present", "ptv70_volume_ml", "parotid_mean_dose_gy", "gtv_volume_ml")

_TOTALSEG_SCANS = (
    # scan id, image, label map
    ("totalseg_example", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
    ("totalseg_example_dicom", "example_ct_dicom", "example_seg_dicom.nii.gz"),
)
_DICOM_SERIES = ("slicer_head_ct", "dcmqi_abdomen_3slice")


def adapt(
    root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    reidentification_copies: int = 0,
) -> AdaptedDataset:
    """Write the shared-CT manifest, labels, label_names.json and dataset.json (docstring)."""
    copies = int(reidentification_copies)
    if copies < 0:
        raise VoxelFMError(f"reidentification_copies must be >= 0, got {copies}")
    root = Path(root)
    fractions = check_fractions(split_fractions)
    table = pd.DataFrame.from_records(
        [*_openkbp(root), *_ibsi(root), *_totalseg(root), *_dicom(root)]
    )
    table["split"] = _split(table, fractions, seed)
    if copies:
        table = pd.concat([table, _reidentification_copies(table, out_dir, copies, seed)])
        table = table.reset_index(drop=True)
    label_names = _label_names(root)
    return write_dataset(
        out_dir,
        name=NAME,
        version=VERSION,
        root=root,
        manifest=_manifest(table),
        labels=_label_table(table),
        columns=_column_descriptions(with_copies=bool(copies)),
        tasks=_suggested_tasks(with_copies=bool(copies)),
        split_method=(
            "OpenKBP validation -> val; OpenKBP train split by patient into train/test "
            f"{fractions[0]}:{fractions[2]} (seed {seed}); other cohorts: seeded patient-level "
            f"split {fractions}"
        ),
        extra={"label_maps": label_names},
        extra_files={"label_names.json": json.dumps(label_names, indent=2) + "\n"},
    )


def _split(table: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Each scan's split (module docstring): OpenKBP keeps its validation set as ``val``."""
    split = np.empty(len(table), dtype=object)
    is_openkbp = (table["cohort"] == "openkbp").to_numpy()
    official = table["official_split"].to_numpy()
    is_validation = is_openkbp & (official == "validation")
    split[is_validation] = "val"
    kbp_train = is_openkbp & ~is_validation
    split[kbp_train] = two_way_split(
        table.loc[kbp_train, "patient_id"],
        fractions[2] / (fractions[0] + fractions[2]),
        ("train", "test"),
        seed,
        stratify=table.loc[kbp_train, "ptv63_present"],
    )
    if (~is_openkbp).any():
        split[~is_openkbp], _ = seeded_split(
            table.loc[~is_openkbp, "patient_id"],
            fractions,
            seed,
            stratify=table.loc[~is_openkbp, "cohort"],
        )
    return split


def _manifest(table: pd.DataFrame) -> pd.DataFrame:
    label_maps = [c for c in table.columns if c.startswith("label_")]
    return table[["scan_id", "patient_id", "image", *label_maps]].fillna("")


def _label_table(table: pd.DataFrame) -> pd.DataFrame:
    # reindex: a value column whose cohort folder is absent (e.g. no ibsi_sts) stays empty.
    labels = table.reindex(
        columns=[
            "scan_id",
            "patient_id",
            "split",
            "cohort",
            *[c for organ in OPENKBP_ORGANS for c in centroid_columns(ORGAN_COLUMNS[organ])],
            *VALUE_COLUMNS,
        ]
    )
    labels["ptv63_present"] = labels["ptv63_present"].astype("Int64")
    return labels


def _column_descriptions(*, with_copies: bool) -> dict[str, str]:
    cohorts = "openkbp / ibsi / totalseg / dicom"
    if with_copies:
        cohorts += " (+ _copy: a derived re-identification scan)"
    return {
        "cohort": cohorts,
        **{
            c: f"{axis} of the {organ} centroid, RAS world mm (OpenKBP; empty: absent)"
            for organ in OPENKBP_ORGANS
            for axis, c in zip("xyz", centroid_columns(ORGAN_COLUMNS[organ]))
        },
        "ptv63_present": "1 = the OpenKBP plan has a PTV63 (value 2 in ptv.nii.gz), else 0",
        "ptv70_volume_ml": "PTV70 volume in ml from ptv.nii.gz (OpenKBP)",
        "parotid_mean_dose_gy": "mean of the right and left parotid mean doses, Gy (OpenKBP)",
        "gtv_volume_ml": "gross tumour volume in ml from gtv.nii.gz (IBSI)",
    }


def _suggested_tasks(*, with_copies: bool) -> dict[str, dict]:
    tasks: dict[str, dict] = {
        **{
            f"openkbp_{column}_centre": {
                "category": "localisation",
                "labels": centroid_columns(column),
                "probes": ["soft_argmax"],
                "options": {"hit_radius_mm": 15},
                "description": f"locate the {organ} centroid (OpenKBP)",
            }
            for organ, column in ORGAN_COLUMNS.items()
        },
        "openkbp_ptv63": {
            "category": "classification",
            "labels": ["ptv63_present"],
            "probes": ["logistic", "knn"],
            "description": "does the plan have an intermediate-dose (63 Gy) target",
        },
        "openkbp_parotid_dose": {
            "category": "regression",
            "labels": ["parotid_mean_dose_gy"],
            "probes": ["ridge", "mlp"],
            "description": "mean parotid dose of the clinical plan",
        },
        "openkbp_ptv70_volume": {
            "category": "regression",
            "labels": ["ptv70_volume_ml"],
            "probes": ["ridge", "mlp"],
            "description": "high-dose target volume",
        },
        "openkbp_oars": {
            "category": "segmentation",
            "probes": ["conv_decoder"],
            "options": {"label_map": "oars", "classes": _oar_classes()},
            "description": "segment the 7 OpenKBP organs at risk",
        },
        "ibsi_gtv_volume": {
            "category": "regression",
            "labels": ["gtv_volume_ml"],
            "probes": ["ridge", "mlp"],
            "description": "soft-tissue sarcoma volume (IBSI; few patients)",
        },
        "ibsi_gtv": {
            "category": "segmentation",
            "probes": ["conv_decoder"],
            "options": {"label_map": "gtv", "classes": {1: "gtv"}},
            "description": "segment the sarcoma (IBSI)",
        },
    }
    if with_copies:
        tasks["reidentification"] = {
            "category": "retrieval",
            "probes": ["gallery", "pool"],
            "description": "find a patient's other scan (a cropped, noisier copy) among all",
        }
    return tasks


def _oar_classes() -> dict[int, str]:
    """oars.nii.gz value -> organ column prefix."""
    return {k + 1: ORGAN_COLUMNS[organ] for k, organ in enumerate(OPENKBP_ORGANS)}


def _label_names(root: Path) -> dict[str, dict[str, str]]:
    """label map -> {value: class name}, for dataset.json and label_names.json."""
    return {
        "oars": {"0": "background", **{str(k): v for k, v in _oar_classes().items()}},
        "ptv": {"0": "background", **{str(k + 1): p.lower() for k, p in enumerate(PTV_LEVELS)}},
        "gtv": {"0": "background", "1": "gtv"},
        "organs": _totalseg_classes(root),
    }


def _reidentification_copies(
    table: pd.DataFrame, out_dir: Path, copies: int, seed: int
) -> pd.DataFrame:
    """Derived scans (random crop + noise) of every OpenKBP and IBSI scan (module docstring)."""
    folder = Path(out_dir) / "derived"
    folder.mkdir(parents=True, exist_ok=True)
    sources = table[table["cohort"].isin(["openkbp", "ibsi"])]
    records = []
    for row in sources.itertuples(index=False):
        image = nib.load(row.image)
        hu = np.asarray(image.dataobj, dtype=np.float32)
        for k in range(1, copies + 1):
            key = zlib.crc32(f"{seed}/{row.scan_id}/{k}".encode())
            rng = np.random.default_rng([seed, key])
            keep = [max(1, round(n * rng.uniform(0.7, 0.9))) for n in hu.shape]
            start = [int(rng.integers(0, n - m + 1)) for n, m in zip(hu.shape, keep)]
            box = tuple(slice(a, a + m) for a, m in zip(start, keep))
            noisy = hu[box] + rng.normal(0.0, rng.uniform(10.0, 40.0), size=keep)
            # The crop's voxel (0, 0, 0) is the source's voxel `start`: shift the affine.
            affine = image.affine.copy()
            affine[:3, 3] = image.affine[:3, :3] @ np.asarray(start) + image.affine[:3, 3]
            derived = nib.Nifti1Image(np.rint(noisy).astype(np.int16), affine)
            scan_id = f"{row.scan_id}_copy{k}"
            path = folder / f"{scan_id}.nii.gz"
            with atomic_path(path, suffix=".nii.gz") as tmp:
                nib.save(derived, tmp)
            records.append(
                {
                    "scan_id": scan_id,
                    "patient_id": row.patient_id,
                    "image": absolute(path),
                    "cohort": f"{row.cohort}_copy",
                    "split": row.split,
                }
            )
    return pd.DataFrame.from_records(records)


def _openkbp(root: Path) -> list[dict]:
    folder = require_dir(root / "openkbp", "the OpenKBP folder", "openkbp/patients.csv")
    columns = [
        "patient_id",
        "split",
        *[f"{o}_mean_dose_gy" for o in ("RightParotid", "LeftParotid")],
        *[f"{p}_ml" for p in PTV_LEVELS],
    ]
    patients = read_table(
        folder / "patients.csv",
        columns,
        "the OpenKBP patient table",
        "openkbp/patients.csv",
        dtype={"patient_id": str},
    )
    records = []
    for row in patients.itertuples(index=False):
        patient = folder / row.patient_id
        files = {name: patient / f"{name}.nii.gz" for name in ("ct", "oars", "ptv")}
        for path in files.values():
            require_file(
                path, "an OpenKBP patient's ct, oars and ptv", "openkbp/<patient>/oars.nii.gz"
            )
        oars = nib.load(files["oars"])
        organ_stats = label_statistics(
            np.asarray(oars.dataobj), oars.affine, range(1, len(OPENKBP_ORGANS) + 1)
        )
        ptv = nib.load(files["ptv"])
        ptv_stats = label_statistics(np.asarray(ptv.dataobj), ptv.affine, (1, 2, 3))
        doses = pd.to_numeric(
            pd.Series([row.RightParotid_mean_dose_gy, row.LeftParotid_mean_dose_gy]),
            errors="coerce",
        )
        record = {
            "scan_id": row.patient_id,
            "patient_id": row.patient_id,
            "image": absolute(files["ct"]),
            "label_oars": absolute(files["oars"]),
            "label_ptv": absolute(files["ptv"]),
            "cohort": "openkbp",
            "official_split": str(row.split).strip().lower(),
            "ptv63_present": int(ptv_stats[2][1] > 0),
            "ptv70_volume_ml": ptv_stats[3][1],
            "parotid_mean_dose_gy": doses.mean() if doses.notna().any() else np.nan,
        }
        for k, organ in enumerate(OPENKBP_ORGANS, start=1):
            centre = organ_stats[k][0]
            values = (np.nan,) * 3 if centre is None else centre
            record.update(dict(zip(centroid_columns(ORGAN_COLUMNS[organ]), map(float, values))))
        records.append(record)
    return records


def _ibsi(root: Path) -> list[dict]:
    folder = root / "ibsi_sts"
    records = []
    for patient in sorted(folder.glob("STS_*")) if folder.is_dir() else []:
        ct, gtv = patient / "ct.nii.gz", patient / "gtv.nii.gz"
        require_file(ct, "an IBSI patient's ct.nii.gz", "ibsi_sts/STS_001/ct.nii.gz")
        require_file(gtv, "an IBSI patient's gtv.nii.gz", "ibsi_sts/STS_001/gtv.nii.gz")
        mask = nib.load(gtv)
        ((_, volume),) = label_statistics(
            (np.asarray(mask.dataobj) > 0).astype(np.uint8), mask.affine, (1,)
        ).values()
        records.append(
            {
                "scan_id": patient.name,
                "patient_id": patient.name,
                "image": absolute(ct),
                "label_gtv": absolute(gtv),
                "cohort": "ibsi",
                "gtv_volume_ml": volume,
            }
        )
    return records


def _totalseg(root: Path) -> list[dict]:
    folder = root / "totalseg"
    records = []
    for scan_id, image, label in _TOTALSEG_SCANS:
        if (folder / image).exists() and (folder / label).is_file():
            records.append(
                {
                    "scan_id": scan_id,
                    "patient_id": scan_id,  # not said to be the same person
                    "image": absolute(folder / image),
                    "label_organs": absolute(folder / label),
                    "cohort": "totalseg",
                }
            )
    return records


def _totalseg_classes(root: Path) -> dict[str, str]:
    path = root / "totalseg" / "classes.csv"
    if not path.is_file():
        return {}
    classes = read_table(path, ("label", "name"), "TotalSegmentator classes", "label,name")
    return {"0": "background", **{str(int(k)): str(v) for k, v in zip(classes.label, classes.name)}}


def _dicom(root: Path) -> list[dict]:
    records = []
    for name in _DICOM_SERIES:
        folder = root / "dicom" / name
        if folder.is_dir():
            if not any(folder.glob("*.dcm")):
                raise expected(folder, "a DICOM series", f"dicom/{name}/*.dcm")
            records.append(
                {
                    "scan_id": name,
                    "patient_id": name,
                    "image": absolute(folder),
                    "cohort": "dicom",
                }
            )
    return records
