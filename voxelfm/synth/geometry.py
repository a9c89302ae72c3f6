"""Where the patient lies in the scanner, and the voxel grid a scan samples.

Three frames: the patient frame (anatomy, see ``shapes``), the RAS world (scanner mm, what
files store), and voxel indices. ``PatientPose`` maps patient -> world, ``ScanGeometry``
maps index -> world; their composition is what the rasteriser needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np


@dataclass(frozen=True, eq=False)
class PatientPose:
    """world = rotation @ patient + translation (a small tilt and a table position)."""

    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,) mm

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """Patient mm (..., 3) -> RAS world mm (..., 3)."""
        return points @ self.rotation.T + self.translation

    @property
    def world_to_patient(self) -> np.ndarray:
        """4x4 affine from RAS world mm to patient mm."""
        inverse = np.eye(4)
        inverse[:3, :3] = self.rotation.T
        inverse[:3, 3] = -self.rotation.T @ self.translation
        return inverse


@dataclass(frozen=True, eq=False)
class ScanGeometry:
    """A voxel grid: ``shape`` (I, J, K) and its 4x4 index -> RAS mm ``affine`` (nibabel)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        """(3,) mm between voxel centres along each index axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def axcodes(self) -> str:
        """Closest anatomical direction of each index axis, e.g. "PLI"."""
        return "".join(nib.orientations.aff2axcodes(self.affine))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def index_to_patient(self, pose: PatientPose) -> np.ndarray:
        """4x4 affine from voxel index to patient mm for a patient lying at ``pose``."""
        return pose.world_to_patient @ self.affine

    def flipped(self, axis: int) -> ScanGeometry:
        """The same voxels with index axis ``axis`` reversed (array[..., ::-1] along it)."""
        affine = self.affine.copy()
        affine[:3, 3] += affine[:3, axis] * (self.shape[axis] - 1)
        affine[:3, axis] *= -1.0
        return ScanGeometry(shape=self.shape, affine=affine)

    def index_to_world(self, indices: np.ndarray) -> np.ndarray:
        """Voxel indices (..., 3) -> RAS mm (..., 3)."""
        return np.asarray(indices, dtype=float) @ self.affine[:3, :3].T + self.affine[:3, 3]


def grid_geometry(
    axcodes: str,
    counts: np.ndarray,
    spacing_mm: np.ndarray,
    centre: np.ndarray,
    tilt: np.ndarray | None = None,
) -> ScanGeometry:
    """A grid whose index axes point along ``axcodes`` (turned by ``tilt``), centred on ``centre``.

    Args:
        axcodes: direction of index axes 0, 1, 2, e.g. "LPS" or "PLI" (any permutation/flip).
        counts: (3,) number of voxels along the R, A, S axes of the (tilted) grid frame.
        spacing_mm: (3,) voxel size along the same axes.
        centre: (3,) RAS mm of the grid centre.
        tilt: optional (3, 3) rotation of the grid about its centre (oblique acquisitions).
    """
    orientation = nib.orientations.axcodes2ornt(tuple(axcodes))  # rows: (world axis, sign)
    world_axis = orientation[:, 0].astype(int)
    directions = np.zeros((3, 3))
    directions[world_axis, np.arange(3)] = orientation[:, 1]
    if tilt is not None:
        directions = tilt @ directions
    linear = directions * np.asarray(spacing_mm)[world_axis][None, :]
    shape = tuple(int(n) for n in np.asarray(counts)[world_axis])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre) - linear @ ((np.array(shape) - 1) / 2.0)
    return ScanGeometry(shape=shape, affine=affine)
