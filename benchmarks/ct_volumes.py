"""Realistic full-size CT volumes (int16 HU, RAS (X, Y, Z)) for the benchmarks.

Two kinds, both 512 x 512 x 300 by default:

- ``real``: the 20 real 512 x 512 slices of the TotalSegmentator DICOM series, stacked to
  the requested depth by mirror tiling, each 40-slice period shifted in-plane by a random
  offset. Every voxel is a real CT value with real noise; the shift stops compressors from
  finding exact copies of earlier periods, which would flatter them. Blosc-lz4 compresses
  the tiled volume 2.2x in 64^3 chunks, the untouched series 2.3x.
- ``synthetic``: an elliptical body (fat rim, soft tissue, lungs with vessels, spine) with
  20 HU Gaussian noise, inside a circular field of view padded with -1024.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from voxelfm.conventions import HU_MAX, HU_MIN

REAL_SERIES = Path("totalseg") / "example_ct_dicom"
FULL_SHAPE = (512, 512, 300)


def read_real_slices(data_root: Path) -> np.ndarray:
    """The real DICOM series as int16 HU, array axes (X, Y, Z) as stored (LPS-ish)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data_root / REAL_SERIES)))
    zyx = sitk.GetArrayFromImage(reader.Execute())
    # LPS -> RAS: flip the first two axes so anterior/right point the canonical way.
    xyz = zyx.transpose(2, 1, 0)[::-1, ::-1, :]
    return np.clip(xyz, HU_MIN, HU_MAX).astype(np.int16)


def tiled_real_ct(slices: np.ndarray, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Mirror-tile ``slices`` (X, Y, n) to ``shape``, shifting each period in-plane."""
    rng = np.random.default_rng(seed)
    n = slices.shape[2]
    period = np.r_[np.arange(n), np.arange(n)[::-1]]
    out = np.empty(shape, dtype=np.int16)
    base = _fit_in_plane(slices, shape[:2])
    for z0 in range(0, shape[2], len(period)):
        offset = rng.integers(-40, 41, size=2)
        block = np.roll(base[:, :, period], tuple(offset), axis=(0, 1))
        depth = min(len(period), shape[2] - z0)
        out[:, :, z0 : z0 + depth] = block[:, :, :depth]
    return out


def synthetic_ct(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """CT-like phantom with realistic noise and air/padding fractions."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    z = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, :]
    breathe = 1 + 0.08 * np.sin(np.pi * z)  # the body outline varies along the axis
    body = (x / (0.8 * breathe)) ** 2 + (y / (0.55 * breathe)) ** 2
    lungs = np.minimum(
        ((x - 0.35) / 0.28) ** 2 + ((y - 0.05) / 0.35) ** 2 + (z / 1.2) ** 2,
        ((x + 0.35) / 0.28) ** 2 + ((y - 0.05) / 0.35) ** 2 + (z / 1.2) ** 2,
    )
    spine = np.broadcast_to((x / 0.08) ** 2 + ((y + 0.4) / 0.08) ** 2, shape)
    # Coarse 8-voxel texture stands in for vessels and parenchyma.
    texture = rng.normal(0, 60, (nx // 8 + 1, ny // 8 + 1, nz // 8 + 1)).astype(np.float32)
    texture = texture.repeat(8, 0).repeat(8, 1).repeat(8, 2)[:nx, :ny, :nz]
    volume = np.select(
        [spine < 1, lungs < 1, body < 0.8, body < 1],
        [np.float32(700), texture - 850, texture / 4 + 40, np.float32(-100)],
        default=np.float32(-1000),
    )
    volume += rng.normal(0, 20, shape).astype(np.float32)
    volume[np.broadcast_to(x**2 + y**2 > 1, shape)] = HU_MIN  # outside the field of view
    return np.clip(np.round(volume), HU_MIN, HU_MAX).astype(np.int16)


def benchmark_volumes(
    kind: str, count: int, shape: tuple[int, int, int], data_root: Path | None, seed: int = 0
) -> Iterator[tuple[str, np.ndarray]]:
    """``count`` volumes of ``kind`` ('real' or 'synthetic'), one at a time."""
    slices = read_real_slices(data_root) if kind == "real" else None
    for i in range(count):
        if slices is not None:
            yield f"{kind}_{i:02d}", tiled_real_ct(slices, shape, seed + i)
        else:
            yield f"{kind}_{i:02d}", synthetic_ct(shape, seed + i)


def _fit_in_plane(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop or pad (with air) the in-plane axes to ``size``."""
    out = np.full((*size, slices.shape[2]), HU_MIN, dtype=np.int16)
    nx, ny = min(size[0], slices.shape[0]), min(size[1], slices.shape[1])
    out[:nx, :ny] = slices[:nx, :ny]
    return out
