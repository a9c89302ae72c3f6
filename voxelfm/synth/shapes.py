"""Solid primitives in patient-frame millimetres.

Every shape maps points (..., 3) to a *normalised radius*: below 1 inside, 1 on the surface.
One number serves painting (radius <= 1), cortical rims (radius close to 1) and membership
tests alike. Shapes also give a conservative axis-aligned bounding box so the rasteriser only
evaluates voxels that can be inside.

Patient frame: x toward the patient's Right, y Anterior, z Superior (RAS), origin on the
midline at the level of the right hemidiaphragm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Shape(Protocol):
    def normalised_radius(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 3) in patient mm -> (...) radius, < 1 inside."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) corners (3,) of a box that contains the whole shape."""


@dataclass(frozen=True, eq=False)
class _OrientedShape:
    """A unit shape stretched by ``semi_axes``, turned by ``rotation`` and moved to ``centre``.

    rotation: (3, 3) whose columns are the shape's own axes expressed in the patient frame.
    """

    centre: np.ndarray  # (3,) mm
    semi_axes: np.ndarray  # (3,) mm
    rotation: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))

    def local(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 3) in patient mm -> (..., 3) in units of the semi-axes."""
        # Computed in the points' precision (float32 for scan grids): sub-micrometre error
        # at half the memory traffic.
        dtype = points.dtype
        centred = points - self.centre.astype(dtype)
        return (centred @ self.rotation.astype(dtype)) / self.semi_axes.astype(dtype)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        # The box around the rotated bounding box of the unit shape: exact for axis-aligned
        # shapes, a few percent loose for the small rotations used here.
        half = np.abs(self.rotation) @ self.semi_axes
        return self.centre - half, self.centre + half

    def scaled(self, factor: float) -> _OrientedShape:
        """The same shape grown by ``factor`` about its centre."""
        return dataclasses.replace(self, semi_axes=self.semi_axes * factor)


class Ellipsoid(_OrientedShape):
    def normalised_radius(self, points: np.ndarray) -> np.ndarray:
        return np.linalg.norm(self.local(points), axis=-1)

    @property
    def volume_mm3(self) -> float:
        return float(4.0 / 3.0 * np.pi * np.prod(self.semi_axes))


class EllipticCylinder(_OrientedShape):
    """A capped cylinder along its own third axis (length 2 * semi_axes[2])."""

    def normalised_radius(self, points: np.ndarray) -> np.ndarray:
        q = self.local(points)
        # max() of the radial and axial terms makes a flat cap, and rim voxels near both the
        # wall and the caps (vertebral endplates are cortical bone too).
        return np.maximum(np.hypot(q[..., 0], q[..., 1]), np.abs(q[..., 2]))


@dataclass(frozen=True, eq=False)
class RibCage:
    """Pairs of ribs: tubes following the posterior and lateral part of an axial ellipse.

    The ring is the ellipse (x / a)^2 + (y / b)^2 = 1 around the patient's long axis. Rib n
    (0 = lowest) sits at height ``z_lowest + n * pitch`` at y = 0 and drops ``slope`` mm per
    mm toward anterior, as real ribs do. Bone stops at ``y = anterior_limit * b`` (costal
    cartilage beyond) and ``midline_gap`` mm either side of the midline (the spine).
    One shape for the whole cage: each point is measured against its nearest rib.
    """

    ring_semi_axes: tuple[float, float]  # (a, b) mm
    z_lowest: float
    pitch: float
    count: int
    tube_radius: float = 5.0
    slope: float = 0.35
    anterior_limit: float = 0.55
    midline_gap: float = 25.0

    def normalised_radius(self, points: np.ndarray) -> np.ndarray:
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        a, b = self.ring_semi_axes
        # (ring radius - 1) times the mean semi-axis approximates the distance to the
        # ellipse well for the mildly eccentric body outline.
        radial = (np.hypot(x / a, y / b) - 1.0) * ((a + b) / 2.0)
        height = z - self.z_lowest + self.slope * y
        nearest_rib = np.clip(np.round(height / self.pitch), 0, self.count - 1)
        vertical = height - nearest_rib * self.pitch
        radius = np.hypot(radial, vertical) / self.tube_radius
        off_arc = (np.abs(x) < self.midline_gap) | (y > self.anterior_limit * b)
        return np.where(off_arc, np.inf, radius)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.ring_semi_axes
        r = self.tube_radius
        y_max = self.anterior_limit * b + r
        z_low = self.z_lowest - self.slope * y_max - r
        z_high = self.z_lowest + (self.count - 1) * self.pitch + self.slope * (b + r) + r
        return np.array([-a - r, -b - r, z_low]), np.array([a + r, y_max, z_high])
