"""Generate the embedded demo dataset: a synthetic CT cohort with labels, reports, survival.

Layout of ``out_dir``::

    manifest.csv        scan_id, patient_id, image, label_seg (paths relative to out_dir)
    labels.csv          per scan: finding, target, survival_time, event, lesion_{x,y,z}_mm,
                        n_lesions, report, split (see outcomes.COLUMN_DESCRIPTIONS)
    label_names.json    label value -> structure name for the label maps
    patients.csv        per patient ground truth: drawn traits, lesions, log-hazard, survival
    acquisitions.csv    per scan: format, axcodes, shape, spacing, obliquity, noise, encoding
    cohort.json         generator version, arguments and column descriptions
    images/<scan>.nii.gz   NIfTI scans
    dicom/<scan>/*.dcm     DICOM series
    labels/<scan>.nii.gz   label maps, on the same grid as their scan

Everything is a pure function of the arguments: patient ``p`` and its scans use random
streams keyed by (seed, p), so a larger cohort extends a smaller one with the same patients.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.synth.anatomy import LABELS, make_phantom
from voxelfm.synth.outcomes import (
    COLUMN_DESCRIPTIONS,
    draw_survival,
    log_hazard,
    scan_targets,
    suggest_splits,
    visible_lesions,
)
from voxelfm.synth.protocol import ScanPlan, draw_scan_plan
from voxelfm.synth.render import RenderedScan, render_scan
from voxelfm.synth.report import write_report
from voxelfm.synth.tables import SCAN_TABLES
from voxelfm.synth.writers import dicom_reading_order, save_dicom, save_nifti

GENERATOR_VERSION = 1
MARKER_FILE = "cohort.json"  # present only in a finished cohort

# Independent random streams: cohort-level choices, patients, scans.
_COHORT_STREAM, _PATIENT_STREAM, _SCAN_STREAM = 0, 1, 2


def generate_cohort(
    out_dir: str | os.PathLike,
    *,
    n_patients: int = 40,
    repeat_fraction: float = 0.3,
    seed: int = 0,
    dicom_fraction: float = 0.3,
    shape_range: tuple[int, int] = (64, 96),
    spacing_range: tuple[float, float] = (3.0, 5.0),
    progress: bool = True,
) -> Path:
    """Write a synthetic CT cohort to ``out_dir`` and return the path of its manifest.

    Args:
        n_patients: number of patients; each has a baseline scan.
        repeat_fraction: fraction of patients (rounded) that also get a repeat scan: same
            anatomy, new pose, field of view, spacing, orientation, noise, slightly grown
            lesions.
        seed: everything is deterministic given the seed.
        dicom_fraction: fraction of all scans (rounded) written as DICOM series.
        shape_range: (min, max) voxels along each axis.
        spacing_range: (min, max) mm; in-plane spacing is drawn in it, slice spacing
            between the in-plane spacing and the max.
        progress: show a progress bar.

    The cohort is built in a temporary sibling folder and renamed into place, so an
    interrupted run leaves no complete-looking cohort. An existing ``out_dir`` is replaced
    only if it is empty or a previous cohort.
    """
    _check_arguments(n_patients, repeat_fraction, dicom_fraction, shape_range, spacing_range)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        arguments = {
            "n_patients": n_patients,
            "repeat_fraction": repeat_fraction,
            "seed": seed,
            "dicom_fraction": dicom_fraction,
            "shape_range": [int(n) for n in shape_range],
            "spacing_range": [float(s) for s in spacing_range],
        }
        _write_cohort(staging, **arguments, progress=progress)
        (staging / MARKER_FILE).write_text(
            json.dumps(
                {
                    "generator": "voxelfm.synth",
                    "version": GENERATOR_VERSION,
                    "arguments": arguments,
                    "columns": COLUMN_DESCRIPTIONS,
                },
                indent=2,
            )
        )
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "manifest.csv"


def _write_cohort(
    root: Path,
    *,
    n_patients: int,
    repeat_fraction: float,
    seed: int,
    dicom_fraction: float,
    shape_range: list[int],
    spacing_range: list[float],
    progress: bool,
) -> None:
    for folder in ("images", "dicom", "labels"):
        (root / folder).mkdir()
    cohort_rng = np.random.default_rng([seed, _COHORT_STREAM])
    n_repeated = round(repeat_fraction * n_patients)
    repeated = set(cohort_rng.choice(n_patients, n_repeated, replace=False).tolist())
    scans = [(p, s) for p in range(n_patients) for s in range(2 if p in repeated else 1)]
    n_dicom = round(dicom_fraction * len(scans))
    as_dicom = {scans[i] for i in cohort_rng.choice(len(scans), n_dicom, replace=False)}

    patient_rows, scan_rows = [], []
    for p in tqdm(range(n_patients), desc="synthetic cohort", unit="patient", disable=not progress):
        formats = ["dicom" if (p, s) in as_dicom else "nifti" for s in range(1 + (p in repeated))]
        patient_row, rows = _write_patient(
            root, p, formats, seed=seed, shape_range=shape_range, spacing_range=spacing_range
        )
        patient_rows.append(patient_row)
        scan_rows += rows

    scan_table = pd.DataFrame(scan_rows)
    # A patient's stratum is its baseline finding: repeat scans follow their patient.
    baseline_finding = scan_table.groupby("patient_id")["finding"].transform("first")
    scan_table["split"] = suggest_splits(scan_table["patient_id"], baseline_finding, seed)
    for name, columns in SCAN_TABLES.items():
        scan_table[columns].to_csv(root / name, index=False)
    pd.DataFrame(patient_rows).to_csv(root / "patients.csv", index=False)
    label_names = {"0": "background", **{str(value): name for name, value in LABELS.items()}}
    (root / "label_names.json").write_text(json.dumps(label_names, indent=2))


def _write_patient(
    root: Path,
    index: int,
    scan_formats: list[str],
    *,
    seed: int,
    shape_range: list[int],
    spacing_range: list[float],
) -> tuple[dict, list[dict]]:
    """Draw patient ``index``, write its scans; returns its patients.csv row and scan rows."""
    patient_rng = np.random.default_rng([seed, _PATIENT_STREAM, index])
    patient_id = f"syn{index:04d}"
    phantom = make_phantom(patient_rng, patient_id)
    risk = log_hazard(phantom.lesion_volume_ml(), phantom.liver_hu)
    survival_time, event = draw_survival(patient_rng, risk)
    survival = {"survival_time": round(survival_time, 2), "event": event}
    patient_row = {
        "patient_id": patient_id,
        "n_scans": len(scan_formats),
        **{name: round(value, 4) for name, value in phantom.traits.items()},
        "n_lung_nodules": sum(x.kind == "lung_nodule" for x in phantom.lesions),
        "n_liver_lesions": sum(x.kind == "liver_lesion" for x in phantom.lesions),
        "lesion_volume_ml": round(phantom.lesion_volume_ml(), 3),
        "log_hazard": round(risk, 4),
        **survival,
    }
    scan_rows = []
    for s, scan_format in enumerate(scan_formats):
        scan_rng = np.random.default_rng([seed, _SCAN_STREAM, index, s])
        scan_id = f"{patient_id}_s{s + 1}"
        plan = draw_scan_plan(
            scan_rng,
            phantom,
            scan_format=scan_format,
            baseline=s == 0,
            shape_range=tuple(shape_range),
            spacing_range=tuple(spacing_range),
        )
        rendered = render_scan(phantom, plan.geometry, plan.pose, plan.acquisition)
        lesions = visible_lesions(phantom, plan, rendered)
        targets = scan_targets(plan, rendered, lesions)
        report = write_report(
            scan_rng, lesions, liver_hu=phantom.liver_hu, liver_volume_ml=targets["target"]
        )
        scan_rows.append(
            {
                "scan_id": scan_id,
                "patient_id": patient_id,
                **_save_scan(root, scan_id, patient_id, plan, rendered, seed),
                **targets,
                **survival,
                "report": report,
                **_describe_acquisition(plan),
            }
        )
    return patient_row, scan_rows


def _save_scan(
    root: Path, scan_id: str, patient_id: str, plan: ScanPlan, rendered: RenderedScan, seed: int
) -> dict[str, str]:
    """Write the image in the plan's format and its label map; returns their relative paths."""
    label_path = Path("labels") / f"{scan_id}.nii.gz"
    if plan.scan_format == "dicom":
        image_path = Path("dicom") / scan_id
        save_dicom(
            rendered.hu,
            plan.geometry,
            root / image_path,
            rescale=plan.encoding,
            patient_id=patient_id,
            uid_seed=f"{seed}/{scan_id}",
        )
        label_map, label_geometry = dicom_reading_order(rendered.labels, plan.geometry)
    else:
        image_path = Path("images") / f"{scan_id}.nii.gz"
        save_nifti(rendered.hu, plan.geometry, root / image_path, encoding=plan.encoding)
        label_map, label_geometry = rendered.labels, plan.geometry
    save_nifti(label_map, label_geometry, root / label_path, encoding="uint8")
    return {"image": image_path.as_posix(), "label_seg": label_path.as_posix()}


def _describe_acquisition(plan: ScanPlan) -> dict:
    encoding = plan.encoding
    if plan.scan_format == "dicom":
        encoding = f"slope={encoding[0]:g},intercept={encoding[1]:g}"
    acquisition = plan.acquisition
    return {
        "format": plan.scan_format,
        "axcodes": plan.geometry.axcodes,
        "shape": "x".join(str(n) for n in plan.geometry.shape),
        "spacing_mm": "x".join(f"{s:.3f}" for s in plan.geometry.spacing),
        "oblique_deg": round(plan.oblique_deg, 2),
        "noise_sd_hu": round(acquisition.noise_sd, 2),
        "contrast_phase": round(acquisition.contrast, 3),
        "lesion_growth": round(acquisition.lesion_growth, 4),
        "encoding": encoding,
    }


def _check_arguments(
    n_patients: int,
    repeat_fraction: float,
    dicom_fraction: float,
    shape_range: tuple[int, int],
    spacing_range: tuple[float, float],
) -> None:
    problems = []
    if n_patients < 1:
        problems.append(f"n_patients must be at least 1, got {n_patients}")
    for name, value in (("repeat_fraction", repeat_fraction), ("dicom_fraction", dicom_fraction)):
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must be in [0, 1], got {value}")
    if len(shape_range) != 2 or not 8 <= shape_range[0] <= shape_range[1]:
        problems.append(f"shape_range must be (min, max) with 8 <= min <= max, got {shape_range}")
    if len(spacing_range) != 2 or not 0.0 < spacing_range[0] <= spacing_range[1]:
        problems.append(
            f"spacing_range must be (min, max) with 0 < min <= max, got {spacing_range}"
        )
    if problems:
        raise VoxelFMError("synthetic cohort: " + "; ".join(problems))


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).is_file():
        raise InputError(out_dir, "exists and is not a synthetic cohort; refusing to replace it")


def _install(staging: Path, out_dir: Path) -> None:
    """Move the finished cohort into place, replacing an older one (checked beforehand)."""
    _check_replaceable(out_dir)
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, retired / out_dir.name)
    os.replace(staging, out_dir)
    shutil.rmtree(retired)
