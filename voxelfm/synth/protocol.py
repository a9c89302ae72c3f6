"""Draw everything that differs between two scans of the same patient.

Patient positioning, field of view, spacing, orientation, obliquity, noise, contrast phase,
lesion growth and how the file stores HU are all per scan; the anatomy is not. That is what
makes repeat scans a ground truth for instance retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.spatial.transform import Rotation

from voxelfm.synth.anatomy import MAX_LESION_GROWTH, Phantom
from voxelfm.synth.geometry import PatientPose, ScanGeometry, grid_geometry
from voxelfm.synth.render import Acquisition

ScanFormat = Literal["nifti", "dicom"]

# Option -> probability. NIfTI files come in any axis order and direction, as they do from
# real converters; DICOM series are axial stacks (slice axis last) written head-first,
# feet-first or with mirrored rows.
NIFTI_AXCODES = dict.fromkeys(("RAS", "LPS", "LAS", "LPI", "PLI", "RPI", "ASR", "IPL"), 1 / 8)
DICOM_AXCODES = {"LPS": 0.5, "LPI": 0.2, "LAS": 0.15, "RPS": 0.15}
OBLIQUE_FRACTION = 0.4  # of DICOM series
OBLIQUE_DEGREES = (3.0, 12.0)
# How HU is stored: NIfTI dtype (uint16 uses scl_inter = -1024), DICOM (slope, intercept).
NIFTI_ENCODINGS = {"int16": 0.5, "float32": 0.25, "uint16": 0.25}
DICOM_RESCALES = {
    (1.0, -1024.0): 0.4,
    (1.0, -1000.0): 0.2,
    (0.5, -1024.0): 0.2,
    (2.0, -3024.0): 0.2,
}

_FOV_MARGIN_MM = 5.0  # kept around the liver and lesions


@dataclass(frozen=True, eq=False)
class ScanPlan:
    scan_format: ScanFormat
    pose: PatientPose
    geometry: ScanGeometry
    acquisition: Acquisition
    encoding: str | tuple[float, float]  # NIfTI dtype name, or DICOM (slope, intercept)
    oblique_deg: float


def draw_scan_plan(
    rng: np.random.Generator,
    phantom: Phantom,
    *,
    scan_format: ScanFormat,
    baseline: bool,
    shape_range: tuple[int, int],
    spacing_range: tuple[float, float],
) -> ScanPlan:
    """Draw one scan of ``phantom``.

    In-plane spacing is drawn from ``spacing_range`` and the slice spacing between it and the
    range's top (thick slices, as in clinical CT). The field of view covers the body width
    plus a margin and 260-400 mm craniocaudally, with voxel counts clipped to
    ``shape_range``; it is placed so the liver and every lesion lie inside whenever the
    field of view is large enough, so per-scan labels describe the same findings.
    The baseline scan shows lesions at their drawn size, a repeat scan up to 15% larger.
    """
    growth = 1.0 if baseline else float(rng.uniform(1.0, MAX_LESION_GROWTH))
    pose = PatientPose(
        rotation=Rotation.from_euler(
            "zyx", rng.uniform(-1, 1, 3) * [4.0, 3.0, 2.0], degrees=True
        ).as_matrix(),
        translation=rng.uniform(-1, 1, 3) * [15.0, 20.0, 60.0],
    )
    in_plane = rng.uniform(*spacing_range)
    spacing = np.array([in_plane, in_plane, rng.uniform(in_plane, spacing_range[1])])

    body_semi_axes = phantom.body_outline.semi_axes[:2]
    in_plane_fov = 2.0 * body_semi_axes + rng.uniform(10.0, 60.0, 2)
    wanted_mm = np.array([*in_plane_fov, rng.uniform(260.0, 400.0)])
    counts = np.clip(np.round(wanted_mm / spacing), *shape_range).astype(int)

    if scan_format == "nifti":
        axcodes, encoding = _pick(rng, NIFTI_AXCODES), _pick(rng, NIFTI_ENCODINGS)
    else:
        axcodes, encoding = _pick(rng, DICOM_AXCODES), _pick(rng, DICOM_RESCALES)
    oblique_deg = 0.0
    tilt = np.eye(3)
    if scan_format == "dicom" and rng.random() < OBLIQUE_FRACTION:
        oblique_deg = float(rng.uniform(*OBLIQUE_DEGREES))
        axis = rng.normal(size=3)
        rotation_vector = axis / np.linalg.norm(axis) * np.deg2rad(oblique_deg)
        tilt = Rotation.from_rotvec(rotation_vector).as_matrix()

    # Choose the centre in the (tilted) grid frame, where the field of view is a plain box.
    required_low, required_high = _grid_frame_box(
        pose, *phantom.liver_and_lesion_bounds(growth), tilt
    )
    nominal = tilt.T @ pose.to_world(np.array([0.0, 0.0, rng.uniform(-20.0, 40.0)]))
    nominal[:2] += rng.normal(0.0, 10.0, 2)
    half_fov = counts * spacing / 2.0
    lowest = required_high + _FOV_MARGIN_MM - half_fov
    highest = required_low - _FOV_MARGIN_MM + half_fov
    centre = np.where(
        lowest <= highest, np.clip(nominal, lowest, highest), (required_low + required_high) / 2.0
    )
    geometry = grid_geometry(axcodes, counts, spacing, tilt @ centre, tilt=tilt)
    acquisition = Acquisition(
        noise_sd=float(rng.uniform(10.0, 30.0)),
        contrast=float(rng.uniform(0.0, 1.0)),
        psf_sigma_voxels=float(rng.uniform(0.5, 0.8)),
        lesion_growth=growth,
        noise_seed=int(rng.integers(2**63)),
    )
    return ScanPlan(scan_format, pose, geometry, acquisition, encoding, oblique_deg)


def _grid_frame_box(
    pose: PatientPose, low: np.ndarray, high: np.ndarray, tilt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Box, in the tilted grid frame, around a patient-frame box placed at ``pose``."""
    corners = np.array(np.meshgrid(*zip(low, high), indexing="ij")).reshape(3, -1).T  # (8, 3)
    in_grid_frame = pose.to_world(corners) @ tilt  # rows: tilt.T @ world
    return in_grid_frame.min(axis=0), in_grid_frame.max(axis=0)


def _pick(rng: np.random.Generator, weighted: dict):
    """One key of ``weighted`` (option -> probability)."""
    options = list(weighted)
    return options[rng.choice(len(options), p=list(weighted.values()))]
