"""One scan (and its label maps) from source files to a ``CanonicalVolume``.

read (``readers``) -> resample onto the canonical RAS grid (``canonical``) -> round and clip
HU to int16; label maps are resampled by nearest neighbour onto the image's grid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk

from voxelfm.conventions import DEFAULT_SPACING_MM, HU_MAX, HU_MIN, PREPROCESSING_VERSION
from voxelfm.errors import InputError
from voxelfm.io.canonical import CanonicalGrid, to_canonical
from voxelfm.io.geometry import DEFAULT_LIMITS, GeometryLimits, ras_bounding_box
from voxelfm.io.readers import read_image
from voxelfm.volume import CanonicalVolume

# A CT field of view almost always holds air (outside the body, lungs, bowel gas); a volume
# with nothing below this is either a tight crop or values that are not HU.
_AIR_CHECK_HU = -500.0
_GRID_MATCH_TOLERANCE = 1e-3  # mm and direction cosines


def preprocess_scan(
    image_path: str | os.PathLike,
    label_paths: Mapping[str, str | os.PathLike] | None = None,
    *,
    spacing: tuple[float, float, float] | None = DEFAULT_SPACING_MM,
    hu_range: tuple[int, int] = (HU_MIN, HU_MAX),
    series_uid: str | None = None,
    rescale: tuple[float, float] | None = None,
    limits: GeometryLimits = DEFAULT_LIMITS,
) -> CanonicalVolume:
    """Read a CT scan and its label maps and put them on the canonical grid.

    image_path: DICOM series folder or NIfTI/NRRD/MetaImage file (see ``read_image``).
    label_paths: name -> label map file (integer values, 0 = background) in the same world
        as the image; any grid, resampled by nearest neighbour onto the image's grid.
    spacing: target mm along (X, Y, Z); None keeps the native spacing (reorient only).
    hu_range: HU are rounded, then clipped to this range (padding such as -3024 becomes air).
    rescale: (slope, intercept) turning the file's values into HU, for files that hold raw
        stored values with the rescale kept elsewhere (the manifest's rescale columns);
        None: the reader's values (after the file's own rescale tags) are HU.
    limits: plausible voxel sizes and counts, of the files and of the canonical grid.

    Returns a CanonicalVolume with int16 image (X, Y, Z) and uint8 labels (uint16 when a
    label value exceeds 255). Raises InputError for unusable files.
    """
    hu_low, hu_high = _check_hu_range(hu_range)
    image, source_meta = read_image(image_path, series_uid=series_uid, limits=limits)
    if rescale is not None:
        slope, intercept = (float(v) for v in rescale)
        image = sitk.Cast(image, sitk.sitkFloat32) * slope + intercept
        source_meta = {**source_meta, "manifest_rescale": [slope, intercept]}
    warnings = list(source_meta["warnings"])
    if float(sitk.GetArrayViewFromImage(image).min()) > _AIR_CHECK_HU:
        warnings.append(
            f"no voxel below {_AIR_CHECK_HU:.0f} HU: a crop without air, or values that are "
            "not HU (check the rescale tags)"
        )

    grid = CanonicalGrid.covering(image, spacing)
    limits.check_voxels(image_path, grid.shape, "would resample to")
    hu, _, _ = to_canonical(image, reference=grid, interpolator="linear", pad_value=HU_MIN)
    np.rint(hu, out=hu)
    np.clip(hu, hu_low, hu_high, out=hu)
    image_int16 = hu.astype(np.int16, order="C")  # (X, Y, Z)
    del hu

    labels: dict[str, np.ndarray] = {}
    label_meta: dict[str, Any] = {}
    for name, label_path in (label_paths or {}).items():
        labels[name], label_meta[name] = _canonical_label(
            name, label_path, image, grid, warnings, limits
        )

    meta = {
        **{key: value for key, value in source_meta.items() if key != "warnings"},
        "preprocessing_version": PREPROCESSING_VERSION,
        "spacing": list(grid.spacing),
        "hu_range": [hu_low, hu_high],
        "labels": label_meta,
        "warnings": warnings,
    }
    return CanonicalVolume(
        image=image_int16, spacing=grid.spacing, origin=grid.origin, labels=labels, meta=meta
    )


def _check_hu_range(hu_range: tuple[int, int]) -> tuple[int, int]:
    low, high = (int(v) for v in hu_range)
    info = np.iinfo(np.int16)
    if not info.min <= low < high <= info.max:
        raise ValueError(f"hu_range must be increasing and within int16, got {hu_range}")
    return low, high


def _canonical_label(
    name: str,
    label_path: str | os.PathLike,
    image: sitk.Image,
    grid: CanonicalGrid,
    warnings: list[str],
    limits: GeometryLimits,
) -> tuple[np.ndarray, dict[str, Any]]:
    label, meta = read_image(label_path, limits=limits)
    values = sitk.GetArrayViewFromImage(label)
    if not np.array_equal(values, np.rint(values)):
        raise InputError(label_path, "label map holds non-integer values")
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise InputError(label_path, f"label map holds negative values (down to {low:.0f})")
    if high > np.iinfo(np.uint16).max:
        raise InputError(label_path, f"label value {high:.0f} exceeds 65535")

    label_low, label_high = ras_bounding_box(label)
    image_low, image_high = ras_bounding_box(image)
    if np.any(np.minimum(label_high, image_high) <= np.maximum(label_low, image_low)):
        raise InputError(
            label_path,
            f"does not overlap the image: it spans {_box(label_low, label_high)} mm RAS, "
            f"the image {_box(image_low, image_high)}",
        )
    if not _same_grid(label, image):
        warnings.append(f"label {name!r} is on a different grid from the image; resampled")

    array, _, _ = to_canonical(label, reference=grid, interpolator="nearest", pad_value=0)
    dtype = np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16
    return array.astype(dtype, order="C"), {"source_sha256": meta["source_sha256"]}


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and all(
        np.allclose(getattr(a, attr)(), getattr(b, attr)(), atol=_GRID_MATCH_TOLERANCE)
        for attr in ("GetSpacing", "GetOrigin", "GetDirection")
    )


def _box(low: np.ndarray, high: np.ndarray) -> str:
    return "x".join(f"[{lo:.0f}, {hi:.0f}]" for lo, hi in zip(low, high))
