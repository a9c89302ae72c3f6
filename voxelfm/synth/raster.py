"""Paint an ordered list of solid structures onto any affine voxel grid.

The grid is given by its shape and its voxel-index -> patient-mm affine, so the same code
samples a scan (any spacing, orientation or obliquity, any patient pose) and the tiny probe
grids used to check where a lesion may be placed. Later structures win where they overlap,
which is how the liver dome pushes up the lung base and ribs cut into the body wall.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from voxelfm.synth.shapes import Shape
from voxelfm.synth.texture import RandomField

NO_STRUCTURE = -1


@dataclass(frozen=True, eq=False)
class Structure:
    """A shape with a label and the attenuation it is painted with.

    HU at a point = ``hu`` (or ``core_hu`` where the normalised radius < ``core_fraction``,
    e.g. cancellous bone inside a cortical rim) + ``contrast_hu`` * scan contrast phase
    + ``texture_hu`` * patient texture field.
    """

    label: int  # 0 = unlabelled tissue (fat, muscle)
    shape: Shape
    hu: float
    core_hu: float | None = None
    core_fraction: float = 0.0
    texture_hu: float = 0.0
    contrast_hu: float = 0.0
    clip_to_body: bool = True  # organs never poke out of the body wall


def rasterise(
    structures: Sequence[Structure],
    shape: tuple[int, int, int],
    index_to_patient: np.ndarray,
    *,
    body_interior: Shape,
    texture: RandomField,
    contrast: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``structures`` at the voxel centres of a grid.

    Args:
        structures: painted in order; a later structure overwrites an earlier one.
        shape: grid shape (I, J, K).
        index_to_patient: 4x4 affine from voxel index (i, j, k) to patient mm.
        body_interior: structures with ``clip_to_body`` are painted only inside it.
        texture: the patient's texture field, scaled per structure by ``texture_hu``.
        contrast: contrast phase in [0, 1], scales each structure's ``contrast_hu``.

    Returns:
        instances: (I, J, K) int16, index into ``structures`` of the structure owning each
            voxel, ``NO_STRUCTURE`` (-1) outside all of them (air).
        hu: (I, J, K) float32 noise-free attenuation; air is -1000.
    """
    instances = np.full(shape, NO_STRUCTURE, dtype=np.int16)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    full_grid = tuple(slice(0, n) for n in shape)
    points = _patient_points(full_grid, index_to_patient)  # (I, J, K, 3)
    in_body = body_interior.normalised_radius(points) <= 1.0  # (I, J, K)
    patient_to_index = np.linalg.inv(index_to_patient)
    for index, structure in enumerate(structures):
        box = _index_box(structure.shape.bounds(), patient_to_index, shape)
        if box is None:
            continue
        # Only the voxels whose centres can fall inside the shape are evaluated.
        box_points = points[box]
        radius = structure.shape.normalised_radius(box_points)
        inside = radius <= 1.0
        if structure.clip_to_body:
            inside &= in_body[box]
        if not inside.any():
            continue
        value = np.full(inside.shape, structure.hu + structure.contrast_hu * contrast)
        if structure.core_hu is not None:
            value[radius < structure.core_fraction] = structure.core_hu
        if structure.texture_hu:
            value[inside] += structure.texture_hu * texture(box_points[inside])
        instances[box][inside] = index
        hu[box][inside] = value[inside]
    return instances, hu


def _index_box(
    bounds: tuple[np.ndarray, np.ndarray], patient_to_index: np.ndarray, shape: tuple[int, ...]
) -> tuple[slice, slice, slice] | None:
    """Slices of the grid covering a patient-frame box, or None when they miss the grid."""
    corners = np.array(list(itertools.product(*zip(*bounds))))  # (8, 3)
    indices = corners @ patient_to_index[:3, :3].T + patient_to_index[:3, 3]
    start = np.maximum(np.floor(indices.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(indices.max(axis=0)).astype(int) + 1, shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def _patient_points(box: tuple[slice, slice, slice], index_to_patient: np.ndarray) -> np.ndarray:
    """Patient-mm coordinates (I, J, K, 3) float32 of the voxel centres in ``box``."""
    i, j, k = (np.arange(s.start, s.stop, dtype=np.float32) for s in box)
    linear = index_to_patient[:3, :3].astype(np.float32)
    offset = index_to_patient[:3, 3].astype(np.float32)
    return (
        i[:, None, None, None] * linear[:, 0]
        + j[None, :, None, None] * linear[:, 1]
        + k[None, None, :, None] * linear[:, 2]
        + offset
    )
