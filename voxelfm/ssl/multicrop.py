"""Multi-crop views of a CT scan for DINO/iBOT pretraining, read straight from the store.

Each view is a random region of the scan, read on its own with ``read_crop`` (never the
whole volume), resampled to a cube and augmented. The recipe follows the VoxelFM reference
(rmaguado/VoxelFM ``dinov2/data/augmentations.py`` and ``transforms.py``):

- **Scale is a side-length fraction.** A region is a cube whose side is ``s`` times a
  reference length, ``s`` uniform in the scale range. The reference length is the scan's
  shortest side, as in the reference; ``reference_extent`` fixes it in voxels instead, so
  crops cover the same millimetres in every scan (the store is isotropic). In volume terms
  the global range (0.32, 1.0) is 3-100 % of the reference cube and the local range
  (0.05, 0.32) is 0.01-3 %.
- **Cubes by default.** The reference keeps the output's proportions; on an isotropic grid
  that means undistorted anatomy. ``aspect_ratio_range`` optionally makes x/z and y/z
  log-uniform (the block-masking parametrisation) at the same volume.
- **Placement.** Along an axis where the region fits it lies inside the scan, uniformly;
  where it is longer than the scan it covers the whole axis and the overhang reads as air
  (HU_MIN). Local crops are drawn anywhere in the scan, independently of the global crops,
  and the two global crops are independent draws (the reference does the same; they overlap
  whenever their placements do, which large global crops usually do).
- **Axis permutation** of every crop (the reference permutes all crops, uniformly over the
  six orderings: probability 5/6 of a non-identity one), meaningful because the canonical
  grid is isotropic. **Flips** per axis, on the global crops only as in the reference.
- **Intensity.** HU are clipped to [-1000, 1900] and standardised with the reference's
  dataset statistics (mean -573.8, std 461.3). The first global crop is, with probability
  0.5, also clipped to a random window centred near its own median HU (level ~ median +
  0.2 * IQR * N(0, 1), width ~ U(0.5, 2) * IQR, IQR of the voxels inside the clip range), a
  radiologist-style contrast change that keeps the HU-to-input mapping fixed. Optional
  Gaussian noise (in HU, off by default; the reference has none).

Everything random about a crop is drawn into a :class:`CropPlan` from a
``numpy.random.Generator`` before any voxel is read, so views are a pure function of the
generator's seed and the scan (exact resume, worker-count independence).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from voxelfm.errors import VoxelFMError
from voxelfm.hu import standardise_hu

Triple = tuple[int, int, int]

_IDENTITY: Triple = (0, 1, 2)
_NON_IDENTITY_ORDERS: tuple[Triple, ...] = tuple(
    order for order in itertools.permutations(range(3)) if order != _IDENTITY
)
# Window statistics: robust spread (IQR), with the 1st-99th percentile span as a fallback
# for crops whose middle half is one value (e.g. mostly air).
_WINDOW_QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)


class CropSource(Protocol):
    """What the augmentation needs from a store (``voxelfm.store.VolumeStore`` has it)."""

    def shape(self, scan_id: str) -> Triple: ...

    def read_crop(self, scan_id: str, start: Triple, size: Triple) -> np.ndarray: ...


@dataclass(frozen=True)
class MultiCropConfig:
    """The multi-crop recipe; defaults are the VoxelFM reference values (see module doc)."""

    global_crop_size: int = 112  # G: global crops are (G, G, G) voxels
    local_crop_size: int = 56  # L
    n_local_crops: int = 8
    global_crop_scale: tuple[float, float] = (0.32, 1.0)  # side fraction of the reference
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    reference_extent: int | None = None  # voxels; None = the scan's shortest side
    aspect_ratio_range: tuple[float, float] = (1.0, 1.0)  # x/z and y/z side ratios
    axis_permutation_probability: float = 5 / 6  # of a non-identity axis order
    global_flip_probability: float = 0.5  # per axis
    local_flip_probability: float = 0.0  # per axis
    hu_clip: tuple[float, float] = (-1000.0, 1900.0)
    normalisation_mean: float = -573.8  # HU, after clipping
    normalisation_std: float = 461.3
    global_window_probability: tuple[float, float] = (0.5, 0.0)  # per global view
    window_level_jitter: float = 0.2  # level = median + jitter * IQR * N(0, 1)
    window_width_range: tuple[float, float] = (0.5, 2.0)  # width in IQRs
    min_window_width: float = 10.0  # HU
    noise_std: float = 0.0  # HU; Gaussian noise before clipping

    def __post_init__(self) -> None:
        # YAML gives lists; keep the frozen config hashable and comparable.
        for name in (
            "global_crop_scale",
            "local_crop_scale",
            "aspect_ratio_range",
            "hu_clip",
            "global_window_probability",
            "window_width_range",
        ):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        self._validate()

    @classmethod
    def from_recipe(cls, crops: Mapping[str, Any]) -> MultiCropConfig:
        """From the ``crops`` section of the SSL config (dinov2 key names or field names)."""
        renamed = {_RECIPE_KEY_ALIASES.get(key, key): value for key, value in crops.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(renamed) - known)
        if unknown:
            raise VoxelFMError(f"unknown crops config keys: {', '.join(unknown)}")
        return cls(**renamed)

    def _validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"MultiCropConfig: {message}")

        require(self.global_crop_size >= 1 and self.local_crop_size >= 1, "crop sizes must be >= 1")
        require(self.n_local_crops >= 0, "n_local_crops must be >= 0")
        for name in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            require(0 < low <= high, f"{name} must satisfy 0 < min <= max, got {(low, high)}")
        require(
            self.reference_extent is None or self.reference_extent >= 1,
            "reference_extent must be None or >= 1",
        )
        low, high = self.aspect_ratio_range
        require(0 < low <= 1 <= high, "aspect_ratio_range must satisfy 0 < min <= 1 <= max")
        probabilities = (
            self.axis_permutation_probability,
            self.global_flip_probability,
            self.local_flip_probability,
            *self.global_window_probability,
        )
        require(all(0 <= p <= 1 for p in probabilities), "probabilities must lie in [0, 1]")
        require(len(self.global_window_probability) == 2, "one window probability per global view")
        require(self.hu_clip[0] < self.hu_clip[1], "hu_clip must be (low, high) with low < high")
        require(self.normalisation_std > 0, "normalisation_std must be > 0")
        low, high = self.window_width_range
        require(0 < low <= high, "window_width_range must satisfy 0 < min <= max")
        require(self.window_level_jitter >= 0 and self.noise_std >= 0, "jitter/noise must be >= 0")


_RECIPE_KEY_ALIASES = {
    "global_crops_size": "global_crop_size",
    "local_crops_size": "local_crop_size",
    "local_crops_number": "n_local_crops",
    "global_crops_scale": "global_crop_scale",
    "local_crops_scale": "local_crop_scale",
}


@dataclass(frozen=True)
class WindowDraw:
    """A random HU window in units of the crop's own IQR, resolved once the crop is read."""

    level_offset: float  # window level = median + level_offset * IQR
    width: float  # window width = width * IQR (at least ``min_window_width`` HU)


@dataclass(frozen=True)
class CropPlan:
    """Everything random about one crop, drawn before any voxel is read."""

    start: Triple  # region corner, voxels; negative where the region overhangs the scan
    size: Triple  # region extent (nx, ny, nz), voxels; may exceed the scan
    output_size: int  # S: the region is resampled to (S, S, S)
    axis_order: Triple  # output axis k shows region axis axis_order[k]
    flip_axes: tuple[int, ...]  # output axes reversed, after the permutation
    window: WindowDraw | None  # None: no window augmentation
    noise_seed: int | None  # None: no noise


@dataclass(frozen=True)
class MultiCropPlan:
    global_crops: tuple[CropPlan, ...]  # 2 views
    local_crops: tuple[CropPlan, ...]  # n_local_crops views


def sample_region(
    volume_shape: Triple,
    scale_range: tuple[float, float],
    reference_extent: int | None,
    aspect_ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[Triple, Triple]:
    """A random region ``(start, size)`` of a scan of ``volume_shape`` (see module doc)."""
    reference = min(volume_shape) if reference_extent is None else reference_extent
    side = rng.uniform(*scale_range) * reference  # of the cube with the region's volume
    ratio_low, ratio_high = aspect_ratio_range
    if ratio_low == ratio_high == 1.0:
        ratios = (1.0, 1.0)
    else:
        ratios = tuple(np.exp(rng.uniform(math.log(ratio_low), math.log(ratio_high), size=2)))
    # Sides (r_x * a, r_y * a, a) with r_x * r_y * a^3 = side^3 keep the region's volume.
    side_z = side / (ratios[0] * ratios[1]) ** (1 / 3)
    size = tuple(max(1, round(side_z * r)) for r in (*ratios, 1.0))
    start = tuple(
        # Fits: anywhere inside. Too long: anywhere that still covers the whole axis.
        int(rng.integers(0, dim - n + 1)) if n <= dim else int(rng.integers(dim - n, 1))
        for n, dim in zip(size, volume_shape)
    )
    return start, size  # type: ignore[return-value]


class MultiCropAugmentation:
    """Two global and ``n_local_crops`` local views of one scan.

    ``__call__(store, scan_id, rng)`` returns ``global_crops`` (2, 1, G, G, G) and
    ``local_crops`` (N, 1, L, L, L), float32, standardised HU.
    """

    def __init__(self, config: MultiCropConfig):
        self.config = config

    def __call__(
        self, store: CropSource, scan_id: str, rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        plan = self.plan(store.shape(scan_id), rng)
        crops = (*plan.global_crops, *plan.local_crops)
        # One read for all regions: they overlap, and each chunk is then decoded once.
        read_crops = getattr(store, "read_crops", None)
        if read_crops is not None:
            regions = read_crops(scan_id, [(crop.start, crop.size) for crop in crops])
        else:
            regions = [store.read_crop(scan_id, crop.start, crop.size) for crop in crops]
        rendered = [self.render_region(region, crop) for region, crop in zip(regions, crops)]
        n_global = len(plan.global_crops)
        global_crops, local_crops = rendered[:n_global], rendered[n_global:]
        local_size = self.config.local_crop_size
        return {
            "global_crops": torch.stack(global_crops),  # (2, 1, G, G, G)
            "local_crops": (  # (N, 1, L, L, L)
                torch.stack(local_crops)
                if local_crops
                else torch.empty((0, 1, local_size, local_size, local_size))
            ),
        }

    def plan(self, volume_shape: Triple, rng: np.random.Generator) -> MultiCropPlan:
        """Draw every crop of one sample; a pure function of the shape and ``rng``."""
        cfg = self.config
        global_crops = tuple(
            self._plan_crop(
                volume_shape,
                rng,
                output_size=cfg.global_crop_size,
                scale_range=cfg.global_crop_scale,
                flip_probability=cfg.global_flip_probability,
                window_probability=window_probability,
            )
            for window_probability in cfg.global_window_probability
        )
        local_crops = tuple(
            self._plan_crop(
                volume_shape,
                rng,
                output_size=cfg.local_crop_size,
                scale_range=cfg.local_crop_scale,
                flip_probability=cfg.local_flip_probability,
                window_probability=0.0,
            )
            for _ in range(cfg.n_local_crops)
        )
        return MultiCropPlan(global_crops=global_crops, local_crops=local_crops)

    def _plan_crop(
        self,
        volume_shape: Triple,
        rng: np.random.Generator,
        *,
        output_size: int,
        scale_range: tuple[float, float],
        flip_probability: float,
        window_probability: float,
    ) -> CropPlan:
        cfg = self.config
        start, size = sample_region(
            volume_shape, scale_range, cfg.reference_extent, cfg.aspect_ratio_range, rng
        )
        axis_order = _IDENTITY
        if rng.random() < cfg.axis_permutation_probability:
            axis_order = _NON_IDENTITY_ORDERS[int(rng.integers(len(_NON_IDENTITY_ORDERS)))]
        flip_axes = tuple(int(axis) for axis in np.flatnonzero(rng.random(3) < flip_probability))
        window = None
        if window_probability > 0 and rng.random() < window_probability:
            window = WindowDraw(
                level_offset=cfg.window_level_jitter * rng.standard_normal(),
                width=rng.uniform(*cfg.window_width_range),
            )
        noise_seed = int(rng.integers(2**63)) if cfg.noise_std > 0 else None
        return CropPlan(start, size, output_size, axis_order, flip_axes, window, noise_seed)

    def render(self, store: CropSource, scan_id: str, plan: CropPlan) -> torch.Tensor:
        """Read the planned region and turn it into a (1, S, S, S) float32 network input."""
        return self.render_region(store.read_crop(scan_id, plan.start, plan.size), plan)

    def render_region(self, region: np.ndarray, plan: CropPlan) -> torch.Tensor:
        """(1, S, S, S) float32 network input from the int16 (nx, ny, nz) planned region."""
        cfg = self.config
        hu = torch.from_numpy(region.astype(np.float32))[None, None]  # (1, 1, nx, ny, nz)
        side = plan.output_size
        hu = F.interpolate(hu, size=(side, side, side), mode="trilinear", align_corners=False)
        hu = hu[0, 0].permute(plan.axis_order)  # (S, S, S)
        if plan.flip_axes:
            hu = hu.flip(plan.flip_axes)
        if plan.window is not None:
            hu = _clip_to_random_window(hu, plan.window, cfg)
        if plan.noise_seed is not None:
            noise = np.random.default_rng(plan.noise_seed).standard_normal(hu.shape, np.float32)
            hu = hu + cfg.noise_std * torch.from_numpy(noise)
        hu = standardise_hu(hu, cfg.hu_clip, cfg.normalisation_mean, cfg.normalisation_std)
        return hu.contiguous()[None]


def _clip_to_random_window(
    hu: torch.Tensor, window: WindowDraw, cfg: MultiCropConfig
) -> torch.Tensor:
    """Clip (S, S, S) HU to a window placed relative to the crop's own HU distribution."""
    low, high = cfg.hu_clip
    # Every second voxel per axis: the quantiles barely move and cost an eighth.
    values = hu.numpy()[::2, ::2, ::2]
    # Air below the clip range (and HU_MIN padding) would drag every window toward -1000.
    values = values[(values >= low) & (values <= high)]
    if values.size == 0:
        return hu
    p01, q1, median, q3, p99 = np.quantile(values, _WINDOW_QUANTILES)
    spread = q3 - q1 if q3 - q1 >= 1.0 else max(p99 - p01, 1.0)
    level = median + window.level_offset * spread
    width = max(window.width * spread, cfg.min_window_width)
    return hu.clamp(float(level - width / 2), float(level + width / 2))
