"""Resample any ITK image onto the canonical axis-aligned RAS grid (``voxelfm.conventions``).

The canonical grid covers the input's world bounding box (voxel edges included), centred on
it, so flipped, permuted, oblique and gantry-sheared inputs all land on the same kind of
grid and a label map resampled with the image's grid as ``reference`` stays aligned.

Interpolation: images use linear interpolation. A B-spline would be sharper but overshoots
at the steep air/bone/metal edges of CT, inventing HU that no tissue has (dark rims below
air, bright halos around bone); linear never leaves the range of its neighbours. When the
target spacing is coarser than the source along an axis, the image is first smoothed along
that axis with a Gaussian (``antialias``) so fine noise and structures are averaged rather
than aliased; the result then resembles a scan acquired at the coarser spacing. Labels use
nearest neighbour, which keeps label values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from voxelfm.conventions import DEFAULT_SPACING_MM, HU_MIN
from voxelfm.io.geometry import LPS_TO_RAS, ras_affine, ras_bounding_box

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


@dataclass(frozen=True)
class CanonicalGrid:
    """An axis-aligned RAS grid: array axes (X, Y, Z) point R, A, S.

    shape:   voxels along (X, Y, Z).
    spacing: mm along (X, Y, Z).
    origin:  RAS mm of the centre of voxel (0, 0, 0).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @classmethod
    def covering(
        cls, image: sitk.Image, spacing: tuple[float, float, float] | None = DEFAULT_SPACING_MM
    ) -> CanonicalGrid:
        """The grid with ``spacing`` that covers ``image``'s world bounding box.

        spacing=None keeps the native spacing: each RAS axis takes the spacing of the image
        axis closest to it, so a merely reoriented image is sampled exactly at its voxels.
        """
        spacing_mm = native_ras_spacing(image) if spacing is None else np.asarray(spacing, float)
        if spacing_mm.shape != (3,) or np.any(spacing_mm <= 0):
            raise ValueError(f"spacing must be three positive numbers, got {spacing}")
        low, high = ras_bounding_box(image)
        # round() first so 333.9999999 voxels of extent does not become 334 + 1.
        shape = np.maximum(np.ceil(np.round((high - low) / spacing_mm, 6)), 1).astype(int)
        origin = (low + high) / 2 - (shape - 1) / 2 * spacing_mm
        return cls(
            shape=tuple(int(n) for n in shape),
            spacing=tuple(float(s) for s in spacing_mm),
            origin=tuple(float(o) for o in origin),
        )

    def reference_image(self) -> sitk.Image:
        """An empty ITK image (LPS world) with this grid's geometry, for resampling onto."""
        reference = sitk.Image([int(n) for n in self.shape], sitk.sitkUInt8)
        reference.SetSpacing(self.spacing)
        reference.SetOrigin((LPS_TO_RAS @ np.asarray(self.origin)).tolist())
        reference.SetDirection(LPS_TO_RAS.ravel().tolist())  # index axes point R, A, S
        return reference


def native_ras_spacing(image: sitk.Image) -> np.ndarray:
    """(3,) mm: for each RAS axis, the spacing of the image axis most aligned with it."""
    closest_image_axis = np.argmax(_abs_ras_cosines(image), axis=1)
    return np.asarray(image.GetSpacing(), dtype=float)[closest_image_axis]


def _abs_ras_cosines(image: sitk.Image) -> np.ndarray:
    """(3, 3) |cosine| between RAS axes (rows) and the image's index axes (columns)."""
    steps = np.abs(ras_affine(image)[:3, :3])
    return steps / np.linalg.norm(steps, axis=0, keepdims=True)


def to_canonical(
    image: sitk.Image,
    spacing: tuple[float, float, float] | None = DEFAULT_SPACING_MM,
    *,
    interpolator: str = "linear",
    reference: CanonicalGrid | None = None,
    pad_value: float = HU_MIN,
    antialias: bool = True,
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """Resample ``image`` onto a canonical RAS grid.

    The grid is ``reference`` when given (use the image's grid for its label maps), else
    ``CanonicalGrid.covering(image, spacing)``. interpolator is "linear" (images) or
    "nearest" (labels); samples outside the input get ``pad_value`` (HU_MIN: air).
    ``antialias`` smooths before downsampling and applies to "linear" only.

    Returns (array float32 (X, Y, Z), spacing (3,) mm, origin RAS mm of voxel (0, 0, 0)).
    """
    if interpolator not in _INTERPOLATORS:
        raise ValueError(
            f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {interpolator!r}"
        )
    grid = reference if reference is not None else CanonicalGrid.covering(image, spacing)
    if interpolator == "linear" and antialias:
        image = _smooth_before_downsampling(image, grid)
    resampled = sitk.Resample(
        image,
        grid.reference_image(),
        sitk.Transform(),
        _INTERPOLATORS[interpolator],
        float(pad_value),
        sitk.sitkFloat32,
    )
    array = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)
    return array, grid.spacing, grid.origin


def antialias_sigmas_mm(
    image: sitk.Image, target_spacing: tuple[float, float, float]
) -> np.ndarray:
    """(3,) Gaussian sigma in mm per image axis before resampling to ``target_spacing`` (RAS).

    Along an axis resampled from spacing s to a coarser S, sigma = (s / 2) * sqrt((S / s)^2 - 1):
    a voxel of width s already averages over about s / 2, and the total should reach S / 2.
    Finer or equal target spacing needs no smoothing (sigma 0).
    """
    closest_ras_axis = np.argmax(_abs_ras_cosines(image), axis=0)
    source = np.asarray(image.GetSpacing(), dtype=float)
    target = np.asarray(target_spacing, dtype=float)[closest_ras_axis]
    ratio = np.maximum(target / source, 1.0)
    return source / 2 * np.sqrt(ratio**2 - 1)


def _smooth_before_downsampling(image: sitk.Image, grid: CanonicalGrid) -> sitk.Image:
    sigmas = antialias_sigmas_mm(image, grid.spacing)
    for axis, sigma in enumerate(sigmas):
        # ITK's recursive filter needs 4 voxels along the axis; a 1-3 slice stack is left as is.
        if sigma > 0 and image.GetSize()[axis] >= 4:
            # Recursive (IIR) Gaussian: cost independent of sigma, one float32 copy at a time.
            image = sitk.RecursiveGaussian(image, sigma=float(sigma), direction=axis)
    return image
