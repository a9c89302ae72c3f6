"""Frozen features of one CT volume: whole-volume or sliding-window extraction.

Geometry
--------
Patch token (i, j, k) covers the canonical voxels ``[i*p, (i+1)*p) x [j*p, (j+1)*p) x
[k*p, (k+1)*p)`` (p = the extractor's patch size), so the token grid starts at voxel
(0, 0, 0) and ``Features.grid_affine`` maps a token index to the RAS world position (mm) of
the centre of its patch::

    grid_affine = [[p*sx, 0, 0, ox + sx*(p-1)/2], [0, p*sy, 0, ...], [0, 0, p*sz, ...], [0,0,0,1]]

i.e. ``volume_affine @ [i*p + (p-1)/2, j*p + (p-1)/2, k*p + (p-1)/2, 1]``.

Padding
-------
A volume whose size is not a multiple of p is padded at the **high end** of each axis (never
the low end, so the grid stays anchored at voxel 0) with air, HU_MIN = -1024, up to the next
multiple: the token grid is ``ceil(shape / p)`` and every token holds at least one real voxel.
The ViTs see the padding as air; the handcrafted baseline ignores it (it receives the mask).

Modes
-----
``whole``: the padded volume in one forward pass.
``sliding``: cubic windows of ``window`` voxels (a multiple of p; clipped to the volume's
    grid along any axis where the volume is smaller) placed on the patch lattice with
    stride ``round(window_patches * (1 - overlap))`` patches, the last window of each axis
    flush with the volume's end, run in batches of ``batch_size``. A patch token is the mean
    of its values over the windows that contain it; the global (CLS) vector is the mean over
    windows, weighted by each window's count of real (non-padding) voxels unless
    ``weight_cls_by_coverage=False``. Windows lie inside the padded volume of whole mode, so
    when the volume fits in one window, sliding gives exactly the whole-volume result.
``auto``: sliding when the volume's patch count exceeds ``max_patches`` (the patch budget),
    else whole. Without an explicit ``window``, the sliding window is the largest cube of at
    most ``max_patches`` patches.

``pooled`` is the mean of the patch tokens (the global vector when there are none).
Extraction runs in eval mode under ``torch.inference_mode``: two runs give identical arrays.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from voxelfm.conventions import DEFAULT_SPACING_MM, HU_MAX, HU_MIN
from voxelfm.errors import VoxelFMError
from voxelfm.extract.interface import FeatureExtractor
from voxelfm.volume import CanonicalVolume

Triple = tuple[int, int, int]
MODES = ("auto", "whole", "sliding")
_SPACING_TOLERANCE_MM = 1e-3


@dataclass
class Features:
    """Embeddings of one volume.

    cls:         (D,) float32 global vector (CLS token; the feature vector for handcrafted).
    pooled:      (D,) float32 mean of the patch tokens (== cls when there are none).
    patch:       (gx, gy, gz, D) float32 patch tokens on the canonical (X, Y, Z) grid, or None.
    grid_affine: (4, 4) token index (i, j, k) -> RAS mm of the token's patch centre, or None.
    grid_shape:  (gx, gy, gz), or None.
    volume_shape, spacing, origin: the volume the tokens came from (canonical grid).
    mode:        "whole" or "sliding", as actually run.
    n_windows:   forward passes over the volume (1 for whole).
    meta:        provenance of a volume read from a file (preprocessing metadata), else {}.
    """

    cls: np.ndarray
    pooled: np.ndarray
    patch: np.ndarray | None
    grid_affine: np.ndarray | None
    grid_shape: Triple | None
    volume_shape: Triple
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    mode: str
    n_windows: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def volume_affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def token_centres(self) -> np.ndarray:
        """(gx, gy, gz, 3) RAS mm of every token's patch centre."""
        if self.grid_affine is None or self.grid_shape is None:
            raise ValueError("these features have no patch tokens")
        index = np.stack(np.meshgrid(*(np.arange(n) for n in self.grid_shape), indexing="ij"), -1)
        return index @ self.grid_affine[:3, :3].T + self.grid_affine[:3, 3]


def grid_affine_for(
    spacing: Sequence[float], origin: Sequence[float], patch_size: int
) -> np.ndarray:
    """Token index -> RAS mm of the patch centre, for a grid anchored at voxel (0, 0, 0)."""
    spacing = np.asarray(spacing, dtype=float)
    affine = np.diag([*(spacing * patch_size), 1.0])
    affine[:3, 3] = np.asarray(origin, dtype=float) + spacing * (patch_size - 1) / 2
    return affine


def extract_features(
    source: CanonicalVolume | np.ndarray | torch.Tensor | str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    mode: str = "auto",
    window: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    max_patches: int | None = None,
    batch_size: int = 4,
    weight_cls_by_coverage: bool = True,
    series_uid: str | None = None,
) -> Features:
    """Embed one volume with ``extractor`` (see the module docstring for geometry and modes).

    Args:
        source: a CanonicalVolume; an (X, Y, Z) HU array (numpy or torch) on the canonical
            RAS grid, with ``spacing`` (default: the extractor's, else the store default
            1.5 mm) and ``origin`` (default 0); or a CT file / DICOM folder, read and
            preprocessed as ingestion does (canonical RAS, resampled to ``spacing``, default
            the extractor's ``spacing_mm`` else the store default; HU rounded and clipped).
        extractor: from ``build_extractor``.
        mode: "auto", "whole" or "sliding".
        window: sliding window edge in voxels (int or per-axis triple; multiples of the
            patch size). Default: the largest cube within ``max_patches``.
        overlap: fraction of the window shared by neighbouring windows, in [0, 1).
        max_patches: patch budget of one forward pass (None: unlimited); "auto" slides
            above it, "whole" ignores it.
        batch_size: windows per forward pass in sliding mode.
        weight_cls_by_coverage: weight window CLS vectors by their real-voxel count.
        series_uid: picks one series of a DICOM folder holding several.

    Returns:
        Features (float32 arrays). Raises VoxelFMError/InputError for unusable input,
        ValueError for inconsistent options.
    """
    check_extraction_options(
        extractor,
        mode=mode,
        window=window,
        overlap=overlap,
        max_patches=max_patches,
        batch_size=batch_size,
    )
    hu, vol_spacing, vol_origin, meta = _load(source, extractor, spacing, origin, series_uid)
    shape: Triple = tuple(int(n) for n in hu.shape)  # type: ignore[assignment]
    common = {"volume_shape": shape, "spacing": vol_spacing, "origin": vol_origin, "meta": meta}

    p = extractor.patch_size
    if p is None:  # a global-only extractor: the volume as it is, in one pass
        cls, _ = extractor(torch.from_numpy(hu)[None, None])
        cls_np = cls[0].cpu().numpy().astype(np.float32)
        return Features(cls_np, cls_np.copy(), None, None, None, mode="whole", **common)

    grid: Triple = tuple(math.ceil(n / p) for n in shape)  # type: ignore[assignment]
    n_patches = math.prod(grid)
    if mode == "auto":
        mode = "sliding" if max_patches is not None and n_patches > max_patches else "whole"

    padded = np.full(tuple(g * p for g in grid), HU_MIN, dtype=np.float32)
    padded[: shape[0], : shape[1], : shape[2]] = hu
    volume = torch.from_numpy(padded)[None, None]  # (1, 1, gx*p, gy*p, gz*p)
    valid = torch.zeros(volume.shape, dtype=torch.bool)
    valid[..., : shape[0], : shape[1], : shape[2]] = True

    if mode == "whole":
        cls, patch = extractor(volume, valid)
        cls_np = cls[0].cpu().numpy().astype(np.float32)
        patch_np = patch[0].cpu().numpy().astype(np.float32)
        n_windows = 1
    else:
        window_patches = _window_patches(window, max_patches, p, grid)
        cls_np, patch_np, n_windows = _sliding(
            extractor,
            volume,
            valid,
            grid,
            window_patches,
            overlap,
            batch_size,
            weight_cls_by_coverage,
        )
    if tuple(patch_np.shape[:3]) != grid:
        raise RuntimeError(f"extractor returned a {patch_np.shape[:3]} token grid, expected {grid}")
    pooled = patch_np.reshape(-1, patch_np.shape[-1]).mean(0, dtype=np.float64).astype(np.float32)
    return Features(
        cls=cls_np,
        pooled=pooled,
        patch=patch_np,
        grid_affine=grid_affine_for(vol_spacing, vol_origin, p),
        grid_shape=grid,
        mode=mode,
        n_windows=n_windows,
        **common,
    )


def check_extraction_options(
    extractor: FeatureExtractor,
    *,
    mode: str = "auto",
    window: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    max_patches: int | None = None,
    batch_size: int = 4,
) -> None:
    """Raise ValueError for options no volume could satisfy (checked before a cohort run)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    if extractor.patch_size is None:
        if mode == "sliding":
            raise ValueError(f"backbone {extractor.name!r} has no patch grid: use mode 'whole'")
        return
    if mode == "sliding" or (mode == "auto" and max_patches is not None):
        huge = (1 << 30,) * 3
        _window_patches(window, max_patches, int(extractor.patch_size), huge)  # type: ignore[arg-type]


def window_starts(grid: int, window: int, stride: int) -> list[int]:
    """Window starts (in patches) along one axis: every ``stride``, the last flush with the end."""
    if window >= grid:
        return [0]
    starts = list(range(0, grid - window + 1, stride))
    if starts[-1] != grid - window:
        starts.append(grid - window)
    return starts


def _sliding(
    extractor: FeatureExtractor,
    volume: torch.Tensor,
    valid: torch.Tensor,
    grid: Triple,
    window_patches: Triple,
    overlap: float,
    batch_size: int,
    weight_cls_by_coverage: bool,
) -> tuple[np.ndarray, np.ndarray, int]:
    p = int(extractor.patch_size)  # type: ignore[arg-type]
    strides = [max(1, round(w * (1 - overlap))) for w in window_patches]
    corners = list(
        itertools.product(
            *(window_starts(g, w, s) for g, w, s in zip(grid, window_patches, strides))
        )
    )
    dim = int(extractor.embed_dim)
    patch_sum = np.zeros((*grid, dim), dtype=np.float64)
    patch_count = np.zeros(grid, dtype=np.int64)
    cls_sum = np.zeros(dim, dtype=np.float64)
    cls_weight = 0.0
    for first in range(0, len(corners), batch_size):
        batch = corners[first : first + batch_size]
        slices = [
            tuple(slice(c * p, (c + w) * p) for c, w in zip(corner, window_patches))
            for corner in batch
        ]
        hu = torch.cat([volume[(..., *s)] for s in slices])
        mask = torch.cat([valid[(..., *s)] for s in slices])
        cls, patch = extractor(hu, mask)
        cls = cls.cpu().numpy().astype(np.float64)
        patch = patch.cpu().numpy().astype(np.float64)
        for row, (corner, coverage) in enumerate(zip(batch, mask.flatten(1).sum(1).tolist())):
            token_slices = tuple(slice(c, c + w) for c, w in zip(corner, window_patches))
            patch_sum[token_slices] += patch[row]
            patch_count[token_slices] += 1
            weight = float(coverage) if weight_cls_by_coverage else 1.0
            cls_sum += weight * cls[row]
            cls_weight += weight
    if patch_count.min() < 1:  # cannot happen: the last window of every axis is flush
        raise RuntimeError("sliding windows left tokens uncovered")
    patch_mean = (patch_sum / patch_count[..., None]).astype(np.float32)
    return (cls_sum / cls_weight).astype(np.float32), patch_mean, len(corners)


def _window_patches(
    window: int | Sequence[int] | None, max_patches: int | None, p: int, grid: Triple
) -> Triple:
    """The window in patches per axis, clipped to the volume's grid."""
    if window is None:
        if max_patches is None:
            raise ValueError("sliding mode needs a window or a max_patches budget")
        side = 1  # the largest cube within the budget
        while (side + 1) ** 3 <= max_patches:
            side += 1
        sizes = (side,) * 3
    else:
        voxels = (
            (int(window),) * 3
            if isinstance(window, (int, np.integer))
            else tuple(int(w) for w in window)
        )
        if len(voxels) != 3 or min(voxels) < p or any(w % p for w in voxels):
            raise ValueError(
                f"window {window} must be positive multiples of the patch size {p} (one or three)"
            )
        sizes = tuple(w // p for w in voxels)
        if max_patches is not None and math.prod(sizes) > max_patches:
            raise ValueError(
                f"a window of {voxels} voxels holds {math.prod(sizes)} patches, over the "
                f"max_patches budget of {max_patches}"
            )
    return tuple(min(w, g) for w, g in zip(sizes, grid))  # type: ignore[return-value]


def _load(
    source: Any,
    extractor: FeatureExtractor,
    spacing: Sequence[float] | None,
    origin: Sequence[float] | None,
    series_uid: str | None,
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float], dict[str, Any]]:
    """(float32 HU (X, Y, Z) clipped to the canonical range, spacing, origin, meta)."""
    default_spacing = extractor.spacing_mm or DEFAULT_SPACING_MM
    meta: dict[str, Any] = {}
    if isinstance(source, (str, os.PathLike)):
        from voxelfm.io.preprocess import preprocess_scan

        if origin is not None:
            raise ValueError("origin applies to arrays only; a file has its own geometry")
        source = preprocess_scan(
            source, spacing=tuple(spacing or default_spacing), series_uid=series_uid
        )
        meta = {key: value for key, value in source.meta.items() if key != "labels"}
        spacing = None
    if isinstance(source, CanonicalVolume):
        if spacing is not None or origin is not None:
            raise ValueError("spacing/origin come from the CanonicalVolume; do not pass them")
        image, vol_spacing, vol_origin = source.image, source.spacing, source.origin
        meta = meta or {k: v for k, v in source.meta.items() if k != "labels"}
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        image = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        vol_spacing = tuple(float(s) for s in (spacing or default_spacing))
        vol_origin = tuple(float(o) for o in (origin if origin is not None else (0.0, 0.0, 0.0)))
        if len(vol_spacing) != 3 or len(vol_origin) != 3 or min(vol_spacing) <= 0:
            raise ValueError(f"spacing/origin must be three numbers, got {spacing}, {origin}")
    else:
        raise TypeError(
            "source must be a CanonicalVolume, an (X, Y, Z) HU array or a CT file path, "
            f"got {type(source).__name__}"
        )
    if image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"expected a 3D (X, Y, Z) volume, got shape {tuple(image.shape)}")
    hu = np.asarray(image, dtype=np.float32)
    if not np.isfinite(hu).all():
        raise VoxelFMError("the volume holds non-finite values (NaN or inf)")
    hu = np.clip(hu, HU_MIN, HU_MAX)
    if extractor.spacing_mm is not None and not np.allclose(
        vol_spacing, extractor.spacing_mm, atol=_SPACING_TOLERANCE_MM
    ):
        warnings.warn(
            f"volume spacing {tuple(vol_spacing)} mm differs from the {extractor.spacing_mm} mm "
            f"backbone {extractor.name!r} expects",
            stacklevel=3,
        )
    return hu, tuple(vol_spacing), tuple(vol_origin), meta
