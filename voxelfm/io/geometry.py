"""World geometry of ITK images: LPS <-> RAS, affines, axis codes, bounding boxes.

ITK images live in DICOM's LPS world; VoxelFM's canonical world is RAS (see
``voxelfm.conventions``). The two differ by negating x and y, and nothing else.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import SimpleITK as sitk

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
