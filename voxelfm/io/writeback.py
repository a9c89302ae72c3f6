"""Write a label map from the canonical grid back into a source image's space.

Predictions live on the canonical RAS grid (``voxelfm.conventions``); a user wants them on
the grid of the scan they gave us, to open beside it in a viewer or a planning system.
``write_label_map_to_source`` resamples by nearest neighbour (label values are kept) onto
the source image's exact grid (size, spacing, origin, direction) and writes a NIfTI file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.io.canonical import CanonicalGrid
from voxelfm.io.readers import read_image
from voxelfm.io.sitk_errors import itk_error_reason
from voxelfm.utils.atomic import atomic_path


def canonical_label_image(
    label_map: np.ndarray, spacing: Sequence[float], origin: Sequence[float]
) -> sitk.Image:
    """An ITK image (LPS world) of an (X, Y, Z) label map on the canonical RAS grid."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 3:
        raise VoxelFMError(f"label map must be (X, Y, Z), got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise VoxelFMError(f"label map must hold integers, got {label_map.dtype}")
    if label_map.size and (label_map.min() < 0 or label_map.max() > np.iinfo(np.uint16).max):
        raise VoxelFMError("label values must lie in [0, 65535]")
    dtype = np.uint8 if label_map.size == 0 or label_map.max() <= 255 else np.uint16
    grid = CanonicalGrid(
        shape=tuple(int(n) for n in label_map.shape),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
    )
    # A C-ordered (X, Y, Z) array is an ITK image indexed (Z, Y, X) = (S, A, R): exactly
    # the geometry of the grid's S-A-R reference image.
    image = sitk.GetImageFromArray(np.ascontiguousarray(label_map, dtype=dtype))
    image.CopyInformation(grid.reference_image_sar())
    return image


def label_map_in_source_space(
    label_map: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    source: sitk.Image,
) -> sitk.Image:
    """Nearest-neighbour resampling of a canonical label map onto ``source``'s grid.

    Source voxels outside the canonical grid get 0 (background).
    """
    moving = canonical_label_image(label_map, spacing, origin)
    return sitk.Resample(
        moving,
        source,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        0,
        moving.GetPixelID(),
    )


def write_label_map_to_source(
    label_map: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    source_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    series_uid: str | None = None,
) -> Path:
    """Write ``label_map`` (canonical grid) as a NIfTI label map in the source image's space.

    Args:
        label_map: (X, Y, Z) integer labels on the canonical RAS grid (axes R, A, S).
        spacing: (3,) mm; origin: (3,) RAS mm of voxel (0, 0, 0) of that grid.
        source_path: the scan the label map belongs to: NIfTI, NRRD, MetaImage or a DICOM
            series folder (read with ``voxelfm.io.readers.read_image``).
        out_path: the ``.nii`` / ``.nii.gz`` file to write, atomically.
        series_uid: picks one series of a DICOM folder holding several.

    The output has the source image's size, spacing, origin and direction (so the same
    NIfTI affine for a NIfTI source) and uint8 labels (uint16 above 255). Returns out_path.
    """
    out_path = Path(out_path)
    suffix = ".nii.gz" if out_path.name.endswith(".nii.gz") else out_path.suffix
    if suffix not in (".nii", ".nii.gz"):
        raise VoxelFMError(f"{out_path}: write-back writes NIfTI (.nii or .nii.gz)")
    source, _ = read_image(source_path, series_uid=series_uid)
    resampled = label_map_in_source_space(label_map, spacing, origin, source)
    with atomic_path(out_path, suffix=suffix) as tmp:
        try:
            sitk.WriteImage(resampled, str(tmp), useCompression=suffix == ".nii.gz")
        except RuntimeError as error:
            raise InputError(out_path, f"cannot write the label map: {itk_error_reason(error)}")
    return out_path
