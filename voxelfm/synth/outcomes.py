"""The study's targets, each computed from what the image shows.

* ``finding``: a liver lesion is visible on the scan (its label covers at least one voxel).
* ``target``: liver volume in ml (parenchyma + liver lesions), counted on the scan's label
  map, so it reflects organ size as imaged, not a hidden parameter.
* survival: Weibull times whose log-hazard rises with baseline lesion burden and with falling
  liver attenuation (steatosis), both visible, censored by random follow-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from voxelfm.errors import VoxelFMError
from voxelfm.splits import make_patient_split
from voxelfm.synth.anatomy import LABELS, Lesion, Phantom
from voxelfm.synth.protocol import ScanPlan
from voxelfm.synth.render import RenderedScan

COLUMN_DESCRIPTIONS: dict[str, str] = {
    "finding": "1 when a liver lesion is visible on the scan, else 0",
    "target": "liver volume in ml (parenchyma + liver lesions) on the scan's label map",
    "survival_time": "months from the patient's baseline scan to death or censoring",
    "event": "1 = death observed, 0 = censored (one record per patient, repeated on its scans)",
    "lesion_x_mm": "RAS world x of the largest visible lesion's centre (NaN when none)",
    "lesion_y_mm": "RAS world y of the same centre",
    "lesion_z_mm": "RAS world z of the same centre",
    "n_lesions": "lung nodules + liver lesions visible on the scan",
    "report": "free-text radiology report of the scan",
    "split": "patient-level train/val/test suggestion, stratified by the baseline finding",
}

# Log-hazard per unit of log(1 + lesion ml), and per 10 HU of liver attenuation below
# _REFERENCE_LIVER_HU. Chosen so both covariates matter and the lesion effect dominates.
_HAZARD_PER_LOG_LESION_ML = 1.0
_HAZARD_PER_10_HU_BELOW = 0.5
_REFERENCE_LIVER_HU = 50.0
_WEIBULL_SHAPE = 1.3
_WEIBULL_SCALE_MONTHS = 90.0
_FOLLOW_UP_MONTHS = (12.0, 84.0)
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True, eq=False)
class VisibleLesion:
    """A lesion as it appears on one scan."""

    lesion: Lesion
    diameter_mm: float
    volume_ml: float
    centre_world: np.ndarray  # (3,) RAS mm
    voxels: int


def visible_lesions(
    phantom: Phantom, plan: ScanPlan, rendered: RenderedScan
) -> list[VisibleLesion]:
    """The phantom's lesions that cover at least one voxel of the scan, largest first."""
    growth = plan.acquisition.lesion_growth
    found = [
        VisibleLesion(
            lesion=lesion,
            diameter_mm=lesion.diameter_mm(growth),
            volume_ml=lesion.volume_ml(growth),
            centre_world=plan.pose.to_world(lesion.shape.centre),
            voxels=int(voxels),
        )
        for lesion, voxels in zip(phantom.lesions, rendered.lesion_voxels)
        if voxels > 0
    ]
    return sorted(found, key=lambda visible: -visible.volume_ml)


def scan_targets(plan: ScanPlan, rendered: RenderedScan, lesions: Sequence[VisibleLesion]) -> dict:
    """finding, target, n_lesions and the largest lesion's centre for one scan."""
    liver_voxels = np.isin(rendered.labels, [LABELS["liver"], LABELS["liver_lesion"]]).sum()
    centre = lesions[0].centre_world if lesions else np.full(3, np.nan)
    return {
        "finding": int(any(v.lesion.kind == "liver_lesion" for v in lesions)),
        "target": round(float(liver_voxels * plan.geometry.voxel_volume_ml), 2),
        **{f"lesion_{axis}_mm": round(float(c), 3) for axis, c in zip("xyz", centre)},
        "n_lesions": len(lesions),
    }


def log_hazard(lesion_volume_ml: float, liver_hu: float) -> float:
    """Log relative hazard of a patient from its total lesion volume and liver attenuation."""
    return _HAZARD_PER_LOG_LESION_ML * float(np.log1p(lesion_volume_ml)) + (
        _HAZARD_PER_10_HU_BELOW * (_REFERENCE_LIVER_HU - liver_hu) / 10.0
    )


def draw_survival(rng: np.random.Generator, log_relative_hazard: float) -> tuple[float, int]:
    """(time in months, event) from a proportional-hazards Weibull model with censoring.

    S(t) = exp(-(t / scale)^shape * exp(log_relative_hazard)), inverted at an Exp(1) draw;
    follow-up ends at a uniform time, which censors the patients still alive.
    """
    exponential = rng.exponential()
    death = _WEIBULL_SCALE_MONTHS * (exponential * np.exp(-log_relative_hazard)) ** (
        1.0 / _WEIBULL_SHAPE
    )
    follow_up = rng.uniform(*_FOLLOW_UP_MONTHS)
    return float(min(death, follow_up)), int(death <= follow_up)


def suggest_splits(patient_ids: Sequence[str], finding: Sequence[int], seed: int) -> np.ndarray:
    """(n_scans,) train/val/test per scan, by patient, stratified by finding when possible.

    Tiny cohorts cannot be stratified (or split at all); they fall back to an unstratified
    split, then to everything in train, so generation never fails on the split suggestion.
    """
    for stratify in (finding, None):
        try:
            return make_patient_split(patient_ids, SPLIT_FRACTIONS, seed=seed, stratify=stratify)
        except VoxelFMError:
            continue
    return np.full(len(patient_ids), "train", dtype=object)
