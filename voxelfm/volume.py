"""The in-memory form of a preprocessed scan, shared by readers, the store and the generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voxelfm.conventions import CANONICAL_AXCODES


@dataclass
class CanonicalVolume:
    """A CT volume on the canonical grid (see ``voxelfm.conventions``).

    image:   int16 HU, shape (X, Y, Z), axes pointing R, A, S.
    spacing: voxel size in mm along (X, Y, Z).
    origin:  RAS world position in mm of the centre of voxel (0, 0, 0).
    labels:  label maps on the same grid (integer dtype, 0 = background), keyed by name.
    meta:    JSON-serialisable provenance (source format, original shape/spacing/axcodes,
             source checksum, warnings). Never holds patient-identifying DICOM fields.
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise ValueError(f"image must be 3D, got shape {self.image.shape}")
        for name, label in self.labels.items():
            if label.shape != self.image.shape:
                raise ValueError(
                    f"label {name!r} has shape {label.shape}, image has {self.image.shape}"
                )
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        return CANONICAL_AXCODES

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-index to RAS-mm affine (nibabel convention)."""
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices (..., 3) to RAS world mm (..., 3)."""
        return np.asarray(ijk, dtype=float) * np.asarray(self.spacing) + np.asarray(self.origin)

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """RAS world mm (..., 3) to continuous voxel indices (..., 3)."""
        return (np.asarray(xyz, dtype=float) - np.asarray(self.origin)) / np.asarray(self.spacing)
