"""World geometry of ITK images: LPS <-> RAS, affines, axis codes, bounding boxes.

ITK images live in DICOM's LPS world; VoxelFM's canonical world is RAS (see
``voxelfm.conventions``). The two differ by negating x and y, and nothing else.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from voxelfm.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def index_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    """(3, 3) matrix taking a voxel index step to an LPS mm step: direction @ diag(spacing).

    Columns are the index axes; it need not be orthogonal (gantry-tilted DICOM is sheared).
    """
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 voxel index (i, j, k) -> RAS mm affine of an ITK image (nibabel convention)."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ index_to_lps_matrix(image)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return affine


def axcodes(image: sitk.Image) -> str:
    """Closest anatomical direction of each index axis, e.g. "PLI" (nibabel's aff2axcodes)."""
    return "".join(nib.orientations.aff2axcodes(ras_affine(image)))


def ras_bounding_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) RAS mm corners of the box enclosing the image's voxels, edges included."""
    size = np.asarray(image.GetSize(), dtype=float)
    corner_indices = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in size])))  # (8, 3)
    corners = ras_affine(image) @ np.c_[corner_indices, np.ones(len(corner_indices))].T  # (4, 8)
    return corners[:3].min(axis=1), corners[:3].max(axis=1)


@dataclass(frozen=True)
class GeometryLimits:
    """Plausible CT voxel geometry; a file outside it is refused, naming the limit.

    A header with a voxel size of 1e-6 mm or 1000 mm, or billions of voxels, is a damaged or
    mislabelled file, not a scan: resampling it would give an empty volume or exhaust the
    memory. The workflow sets these from ``preprocess.min_spacing_mm``, ``max_spacing_mm``
    and ``max_voxels`` (workflow/schemas/config.schema.yaml).
    """

    min_spacing_mm: float = 0.05
    max_spacing_mm: float = 20.0
    max_voxels: int = 1_000_000_000

    def check(self, path: str | os.PathLike, size: Sequence[int], spacing: Sequence[float]) -> None:
        """Raise InputError naming ``path`` when a voxel size or the voxel count is outside."""
        spacing = [float(s) for s in spacing]
        shown = "x".join(f"{s:.4g}" for s in spacing)
        if not all(math.isfinite(s) and s >= self.min_spacing_mm for s in spacing):
            raise InputError(
                path,
                f"voxel spacing {shown} mm is below the plausible minimum of "
                f"{self.min_spacing_mm} mm (preprocess.min_spacing_mm)",
            )
        if max(spacing) > self.max_spacing_mm:
            raise InputError(
                path,
                f"voxel spacing {shown} mm is above the plausible maximum of "
                f"{self.max_spacing_mm} mm (preprocess.max_spacing_mm)",
            )
        self.check_voxels(path, size, "holds")

    def check_voxels(self, path: str | os.PathLike, size: Sequence[int], verb: str) -> None:
        voxels = math.prod(int(n) for n in size)
        if voxels > self.max_voxels:
            raise InputError(
                path,
                f"{verb} {'x'.join(str(int(n)) for n in size)} = {voxels:,} voxels, above the "
                f"limit of {self.max_voxels:,} (preprocess.max_voxels)",
            )


DEFAULT_LIMITS = GeometryLimits()
