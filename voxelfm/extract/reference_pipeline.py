"""The reference VoxelFM inference preprocessing (rmaguado/VoxelFM), for the published ViT.

The published checkpoint's authors embed a scan with ``dinov2/inference`` of their repository
(commit fba41a3 read for this module; our own code, none of theirs):

* ``loaders.autoload_ct`` reads the array **as stored** and ignores the orientation in the
  affine: a NIfTI's voxel array (x, y, z) becomes (z, y, x), spacing from the affine's column
  norms, values clipped to [-1000, 1900]; a DICOM series is stacked by ascending
  ``ImagePositionPatient[2]`` as (slices, rows, columns), rescaled to HU and clipped to
  [-1000, 1000], spacing (slice gap, PixelSpacing[0], PixelSpacing[1]).
* ``processing`` / ``distributed.worker`` then run, in this order: ``crop_volume(img, k=21)``
  (voxels above -800 HU, kept where more than half of a 21-voxel cube around them is such;
  their bounding box widened by 10 voxels), ``resize_isotropic`` (trilinear to the smallest
  native spacing, not below 0.75 mm; a volume whose three spacings are equal is left as it
  is), ``resize_max_patches`` (trilinear shrink to at most ``max_patches`` patches; the
  evaluation scripts use 25,000), ``patch_crop`` (centre crop to a multiple of the patch
  size), and ``(img - mean) / std`` with the training config's ``norm`` (no further clip);
  the model runs in fp32 (no autocast).

:func:`reference_features` runs that pipeline on a file with the published backbone (the
tokens on the reference's own grid, for comparison with the reference's outputs);
:func:`prepare_reference` runs the steps after reading on an array and keeps the map of the
input's voxel coordinates onto the model input (``AxisMap``), which the ``published_voxelfm``
backbone's ``preprocessing: reference`` uses to put the tokens back on our patch grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

REFERENCE_MAX_PATCHES = 25_000
CROP_KERNEL = 21  # the kernel the reference's embedding pipeline passes to crop_volume
BODY_HU = -800.0  # crop_volume's body threshold
MIN_SPACING_MM = 0.75
# The reference loaders' clips: every file reader clips to [-1000, 1900] (the training
# data's range); the DICOM reader clips to [-1000, 1000].
FILE_CLIP = (-1000.0, 1900.0)
DICOM_CLIP = (-1000.0, 1000.0)


@dataclass
class StoredArray:
    """A scan as the reference reads it: (D, H, W) HU in file order, clipped."""

    hu: Tensor
    spacing: tuple[float, float, float]  # mm along (D, H, W)
    source_format: str
    clip: tuple[float, float]


def read_stored_array(path: str | os.PathLike, series_uid: str | None = None) -> StoredArray:
    """Read a CT file or DICOM folder in its stored voxel order, as the reference does.

    Our reader (SimpleITK) keeps the file's voxel order: ``GetArrayFromImage`` gives (k, j, i)
    of a NIfTI's (i, j, k) array, which is the reference's ``rearrange("x y z -> z y x")``
    of nibabel's array, and for a DICOM series (slices by position along the slice normal,
    rows, columns), the reference's stacking for an axial series. The affine's orientation is
    ignored, as by the reference.
    """
    import SimpleITK as sitk

    from voxelfm.io.readers import read_image

    image, meta = read_image(path, series_uid=series_uid)
    hu = torch.from_numpy(np.ascontiguousarray(sitk.GetArrayFromImage(image), dtype=np.float32))
    clip = DICOM_CLIP if meta["source_format"] == "dicom" else FILE_CLIP
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    return StoredArray(hu.clamp(*clip), spacing, meta["source_format"], clip)  # type: ignore[arg-type]


def background_box(
    img: Tensor, k: int = CROP_KERNEL, *, empty_ok: bool = False
) -> tuple[slice, slice, slice]:
    """``crop_volume``'s box: voxels > -800 HU kept where they fill over half a k^3 cube,
    bounding box widened by k // 2 and clipped to the volume. With no such voxel the
    reference raises; ``empty_ok`` keeps the whole volume instead (an all-air window)."""
    body = (img > BODY_HU).to(torch.float32)[None, None]
    kernel = torch.ones((1, 1, k, k, k), dtype=torch.float32, device=img.device)
    mask = (F.conv3d(body, kernel, padding="same") > k**3 * 0.5)[0, 0]
    coords = mask.nonzero()
    if coords.numel() == 0:
        if empty_ok:
            return tuple(slice(0, int(n)) for n in img.shape)  # type: ignore[return-value]
        raise ValueError("no body found: every voxel is at or below -800 HU")
    low, high = coords.min(dim=0).values, coords.max(dim=0).values
    return tuple(  # type: ignore[return-value]
        slice(max(int(lo) - k // 2, 0), min(int(hi) + k // 2, n - 1) + 1)
        for lo, hi, n in zip(low, high, img.shape)
    )


def isotropic_size(
    shape: Sequence[int], spacing: Sequence[float], min_spacing: float = MIN_SPACING_MM
) -> tuple[int, int, int]:
    """``resize_isotropic``'s output size (the input size when the spacings are all equal)."""
    if spacing[0] == spacing[1] == spacing[2]:
        return tuple(int(n) for n in shape)  # type: ignore[return-value]
    target = max(min(spacing), min_spacing)
    return tuple(round(n * s / target) for n, s in zip(shape, spacing))  # type: ignore[return-value]


def max_patches_size(
    shape: Sequence[int], patch_size: int, max_patches: int
) -> tuple[int, int, int]:
    """``resize_max_patches``'s output size: a uniform shrink keeping at most ``max_patches``
    patches (the largest count among scales (max/n)^(1/3) x 0.98 ... 1.02, else x 0.95)."""
    n = math.prod(int(s) // patch_size for s in shape)
    if n <= max_patches:
        return tuple(int(s) for s in shape)  # type: ignore[return-value]
    scale = (max_patches / n) ** (1 / 3)

    def scaled(factor: float) -> tuple[int, tuple[int, ...]]:
        size = tuple(int(int(s) * factor) for s in shape)
        return math.prod(s // patch_size for s in size), size

    fitting = [scaled(scale * d) for d in (0.98, 0.99, 1.0, 1.01, 1.02)]
    fitting = [candidate for candidate in fitting if candidate[0] <= max_patches]
    best = max(fitting, key=lambda c: c[0]) if fitting else scaled(scale * 0.95)
    return best[1]  # type: ignore[return-value]


def patch_crop_box(shape: Sequence[int], patch_size: int) -> tuple[slice, slice, slice]:
    """``patch_crop``'s centre crop to a multiple of the patch size (the odd voxel at the end)."""
    box = []
    for n in shape:
        extra = int(n) % patch_size
        box.append(slice(extra // 2, int(n) - extra + extra // 2))
    return tuple(box)  # type: ignore[return-value]


def prepare_reference(
    img: Tensor,
    spacing: Sequence[float] | None,
    patch_size: int,
    *,
    max_patches: int | None = REFERENCE_MAX_PATCHES,
    crop_background: bool = True,
    maps: list | None = None,
    empty_ok: bool = False,
) -> Tensor:
    """The reference's steps after reading: background crop, isotropic resample (skipped when
    ``spacing`` is None: the array is already isotropic), patch budget, patch crop.

    Args:
        img: (D, H, W) HU, already clipped as the reference's loader does.
        maps: optional per-axis ``AxisMap`` (input voxel -> current voxel), updated in place.
        empty_ok: with no body voxel, keep the whole volume instead of raising.

    Returns the (D, H, W) volume the model sees, before standardisation.
    """
    from voxelfm.extract.foreign.common import resize_to

    def crop(x: Tensor, box: Sequence[slice]) -> Tensor:
        if maps is not None:
            for axis, part in enumerate(box):
                maps[axis] = maps[axis].moved(-part.start)
        return x[tuple(box)]

    def resize(x: Tensor, size: Sequence[int]) -> Tensor:
        if tuple(size) == tuple(x.shape):
            return x
        return resize_to(x[None, None], size, maps)[0, 0]

    if crop_background:
        img = crop(img, background_box(img, empty_ok=empty_ok))
    if spacing is not None:
        img = resize(img, isotropic_size(img.shape, spacing))
    if max_patches:
        img = resize(img, max_patches_size(img.shape, patch_size, max_patches))
    return crop(img, patch_crop_box(img.shape, patch_size))


@dataclass
class ReferenceFeatures:
    """The reference's ``VoxelFeatures``: CLS (D,), patch tokens (d, h, w, D), model input."""

    cls: Tensor
    patch: Tensor
    img: Tensor


def reference_features(
    path: str | os.PathLike,
    extractor,
    *,
    max_patches: int | None = REFERENCE_MAX_PATCHES,
    crop_background: bool = True,
    series_uid: str | None = None,
) -> ReferenceFeatures:
    """The reference pipeline (module docstring) on a file with a ``published_voxelfm`` or
    ``random_init`` extractor: tokens on the reference's own (D, H, W) grid, fp32.

    Defaults are those of the reference's embedding pipeline (``run_embedding_pipeline``:
    background crop, 25,000 patches); its ``extract_features`` defaults are
    ``crop_background=False, max_patches=None``.
    """
    stored = read_stored_array(path, series_uid)
    patch_size = int(extractor.patch_size)
    img = prepare_reference(
        stored.hu,
        stored.spacing,
        patch_size,
        max_patches=max_patches,
        crop_background=crop_background,
    )
    normalisation = extractor.normalisation
    x = ((img - normalisation.mean) / normalisation.std).to(extractor.device)
    with torch.inference_mode():
        out = extractor.model(x[None, None])
    return ReferenceFeatures(
        cls=out.x_norm_clstoken[0].float().cpu(),
        patch=out.patch_grid()[0].float().cpu(),
        img=img,
    )
