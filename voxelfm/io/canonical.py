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

Speed. Before smoothing and resampling, the input is re-indexed (``PermuteAxes`` + ``Flip``,
exact: every voxel keeps its world position) so that its index axes run S, A, R like the
grid's. For the usual input, whose axes are parallel to R, A, S up to sign (any
orientation that is not oblique or gantry-tilted), the grids are then parallel and linear
and nearest-neighbour interpolation factor into three 1D passes (``_resample_separable``):
ITK's values (to float32 rounding; tested against ``sitk.Resample``) for a fifth of the
CPU time of ``sitk.Resample`` (0.16 vs 0.82 s for a 434x434x214 output), with temporaries
bounded to a few MB. Oblique and sheared inputs go through
``sitk.Resample``. Either way the result is indexed (S, A, R) in ITK, which is the C-ordered
(X, Y, Z) numpy array: no transposed copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from voxelfm.conventions import DEFAULT_SPACING_MM, HU_MIN
from voxelfm.io.geometry import LPS_TO_RAS, ras_affine, ras_bounding_box

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
# LPS direction matrix (columns = index axes) of index axes pointing S, A, R.
_SAR_DIRECTION = LPS_TO_RAS[:, ::-1]


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

    def reference_image_sar(self) -> sitk.Image:
        """The same grid indexed (S, A, R): ``GetArrayFromImage`` of an image on it is the
        C-ordered (X, Y, Z) array, with no transpose."""
        reference = sitk.Image([int(n) for n in self.shape[::-1]], sitk.sitkUInt8)
        reference.SetSpacing(self.spacing[::-1])
        reference.SetOrigin((LPS_TO_RAS @ np.asarray(self.origin)).tolist())
        reference.SetDirection(_SAR_DIRECTION.ravel().tolist())
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
    # Nearest neighbour rounds ties (a sample exactly between two voxels) towards the higher
    # index of the input as given, like ITK; along a flipped axis that is the lower one.
    flipped = _ras_axes_pointing_backwards(image)
    image = index_like_sar(image)
    if interpolator == "linear" and antialias:
        image = _smooth_before_downsampling(image, grid)
    if _is_sar_aligned(image):
        array = _resample_separable(
            image, grid, interpolator == "linear", float(pad_value), flipped
        )
        return array, grid.spacing, grid.origin
    resampled = sitk.Resample(
        image,
        grid.reference_image_sar(),
        sitk.Transform(),
        _INTERPOLATORS[interpolator],
        float(pad_value),
        sitk.sitkFloat32,
    )
    array = sitk.GetArrayFromImage(resampled)  # index (S, A, R) -> array (X, Y, Z), C order
    return array, grid.spacing, grid.origin


def index_like_sar(image: sitk.Image) -> sitk.Image:
    """``image`` re-indexed so its index axes point (as nearly as they can) S, A, R.

    Only voxels move (axis permutation and flips): every voxel keeps its world position, so
    resampling the result gives the same values as resampling ``image``, faster. An image
    whose axes do not each have a distinct closest RAS axis is returned as it is.
    """
    if image.GetDimension() != 3:
        return image
    cosines = ras_affine(image)[:3, :3]
    closest_ras_axis = np.argmax(np.abs(cosines), axis=0)  # per image index axis
    if sorted(closest_ras_axis) != [0, 1, 2]:
        return image
    # Output index axis k reads input axis order[k]; output axes point S, A, R.
    order = [int(np.flatnonzero(closest_ras_axis == ras_axis)[0]) for ras_axis in (2, 1, 0)]
    flips = [bool(cosines[ras_axis, axis] < 0) for ras_axis, axis in zip((2, 1, 0), order)]
    if order != [0, 1, 2]:
        image = sitk.PermuteAxes(image, order)
    if any(flips):
        image = sitk.Flip(image, flips, flipAboutOrigin=False)
    return image


def _is_sar_aligned(image: sitk.Image) -> bool:
    """True when the image's index axes point exactly S, A, R (to float precision)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return image.GetDimension() == 3 and np.allclose(direction, _SAR_DIRECTION, rtol=0, atol=1e-9)


def _ras_axes_pointing_backwards(image: sitk.Image) -> tuple[bool, bool, bool]:
    """Per RAS axis: does the image index axis closest to it point the opposite way?"""
    if image.GetDimension() != 3:
        return (False, False, False)
    cosines = ras_affine(image)[:3, :3]
    closest = np.argmax(np.abs(cosines), axis=1)  # per RAS axis, an image index axis
    return tuple(bool(cosines[r, closest[r]] < 0) for r in range(3))  # type: ignore[return-value]


def _resample_separable(
    image: sitk.Image,
    grid: CanonicalGrid,
    linear: bool,
    pad_value: float,
    ties_down: tuple[bool, bool, bool] = (False, False, False),
) -> np.ndarray:
    """``sitk.Resample`` onto ``grid`` of an image already indexed like it (S, A, R), one
    axis at a time: trilinear and nearest-neighbour interpolation factor into 1D passes
    when the grids are parallel. Same values as ITK's (float32 rounding aside): a sample is
    inside when its continuous index lies in [-0.5, n - 0.5) along every axis, and within
    the outer half voxel the edge value is used. ``ties_down``: per axis, nearest neighbour
    rounds a sample exactly halfway between two voxels down instead of up. Returns float32
    (X, Y, Z), C order.
    """
    source = sitk.GetArrayViewFromImage(image)  # index (S, A, R) -> array (X, Y, Z)
    if source.dtype != np.float32:
        source = source.astype(np.float32)
    origin = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    spacing = np.asarray(image.GetSpacing(), dtype=float)[::-1]  # (X, Y, Z)
    continuous, inside = [], []
    for axis in range(3):
        c = grid.origin[axis] + np.arange(grid.shape[axis]) * grid.spacing[axis] - origin[axis]
        c /= spacing[axis]
        hits = np.flatnonzero((c >= -0.5) & (c < source.shape[axis] - 0.5))
        lo, hi = (int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, 0)
        continuous.append(c[lo:hi])
        inside.append(slice(lo, hi))
    out = np.empty(grid.shape, dtype=np.float32)
    for axis in range(3):  # the padding outside the input
        for outside in (slice(0, inside[axis].start), slice(inside[axis].stop, None)):
            out[tuple(outside if a == axis else slice(None) for a in range(3))] = pad_value
    if any(len(c) == 0 for c in continuous):
        return out
    # Shrinking axes first keeps the intermediate arrays small.
    order = sorted(range(3), key=lambda a: len(continuous[a]) / source.shape[a])
    values = source
    for step, axis in enumerate(order):
        values = _interpolate_axis(
            values,
            axis,
            continuous[axis],
            linear,
            ties_down[axis],
            out=out[tuple(inside)] if step == 2 else None,
        )
    return out


_SLAB_VOXELS = 1 << 20  # working-set size of one interpolation step


def _interpolate_axis(
    values: np.ndarray,
    axis: int,
    c: np.ndarray,
    linear: bool,
    ties_down: bool,
    out: np.ndarray | None,
) -> np.ndarray:
    """``values`` sampled at continuous indices ``c`` along ``axis`` (float32)."""
    n = values.shape[axis]
    if linear:
        first = np.clip(np.floor(c), 0, n - 1).astype(np.intp)
        second = np.minimum(first + 1, n - 1)
        weight = np.clip(c - first, 0.0, 1.0).astype(np.float32)
        weight = weight.reshape([-1 if a == axis else 1 for a in range(3)])
    else:
        nearest = np.ceil(c - 0.5) if ties_down else np.floor(c + 0.5)
        first = np.clip(nearest, 0, n - 1).astype(np.intp)
    shape = tuple(len(c) if a == axis else values.shape[a] for a in range(3))
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    # Slabs across another axis bound the temporaries to a few MB.
    slab_axis = 1 if axis == 0 else 0
    per_index = int(np.prod(shape)) // max(shape[slab_axis], 1)
    step = max(1, _SLAB_VOXELS // max(per_index, 1))
    for start in range(0, shape[slab_axis], step):
        slab = tuple(
            slice(start, start + step) if a == slab_axis else slice(None) for a in range(3)
        )
        low = np.take(values[slab], first, axis=axis)
        if linear:
            high = np.take(values[slab], second, axis=axis)
            high -= low
            high *= weight
            low += high
        out[slab] = low
    return out


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
