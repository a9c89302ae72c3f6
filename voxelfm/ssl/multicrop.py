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
import numbers
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
class MultiCropSettings:
    """The multi-crop recipe. The defaults are the VoxelFM reference values, those of the
    ``crops`` section of ``voxelfm/configs/ssl_default.yaml`` (a test checks they agree);
    they serve code that builds views without a training config."""

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
        self._check_types()
        # YAML gives lists; keep the frozen settings hashable and comparable.
        for name in _PAIRS:
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        self._validate()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MultiCropSettings:
        """From the ``crops`` section of an SSL config (dinov2 key names or field names)."""
        renamed = {_CONFIG_KEY_ALIASES.get(key, key): value for key, value in config.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(renamed) - known)
        if unknown:
            raise VoxelFMError(
                f"unknown SSL config key 'crops.{unknown[0]}'; known keys here: "
                f"{', '.join(sorted(_config_key(name) for name in known))}"
            )
        return cls(**renamed)

    def _check_types(self) -> None:
        for name in ("global_crop_size", "local_crop_size", "n_local_crops", "reference_extent"):
            value = getattr(self, name)
            if not (_is_integer(value) or (value is None and name == "reference_extent")):
                raise _invalid(name, "an integer", value)
        for name in _PAIRS:
            value = getattr(self, name)
            if not (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and all(_is_number(v) for v in value)
            ):
                raise _invalid(name, "a pair [a, b] of numbers", value)
        for name in _NUMBERS:
            if not _is_number(getattr(self, name)):
                raise _invalid(name, "a number", getattr(self, name))

    def _validate(self) -> None:
        def require(ok: bool, name: str, condition: str) -> None:
            if not ok:
                raise _invalid(name, condition, getattr(self, name))

        require(self.global_crop_size >= 1, "global_crop_size", ">= 1")
        require(self.local_crop_size >= 1, "local_crop_size", ">= 1")
        require(self.n_local_crops >= 0, "n_local_crops", ">= 0")
        for name in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            require(0 < low <= high, name, "[min, max] with 0 < min <= max")
        require(
            self.reference_extent is None or self.reference_extent >= 1,
            "reference_extent",
            "null or >= 1",
        )
        low, high = self.aspect_ratio_range
        require(0 < low <= 1 <= high, "aspect_ratio_range", "[min, max] with 0 < min <= 1 <= max")
        for name in (
            "axis_permutation_probability",
            "global_flip_probability",
            "local_flip_probability",
        ):
            require(0 <= getattr(self, name) <= 1, name, "a probability in [0, 1]")
        require(
            all(0 <= p <= 1 for p in self.global_window_probability),
            "global_window_probability",
            "one probability in [0, 1] per global view",
        )
        require(self.hu_clip[0] < self.hu_clip[1], "hu_clip", "[low, high] with low < high")
        require(self.normalisation_std > 0, "normalisation_std", "> 0")
        low, high = self.window_width_range
        require(0 < low <= high, "window_width_range", "[min, max] with 0 < min <= max")
        require(self.window_level_jitter >= 0, "window_level_jitter", ">= 0")
        require(self.noise_std >= 0, "noise_std", ">= 0")


_PAIRS = (
    "global_crop_scale",
    "local_crop_scale",
    "aspect_ratio_range",
    "hu_clip",
    "global_window_probability",
    "window_width_range",
)
_NUMBERS = (
    "axis_permutation_probability",
    "global_flip_probability",
    "local_flip_probability",
    "normalisation_mean",
    "normalisation_std",
    "window_level_jitter",
    "min_window_width",
    "noise_std",
)
# The dinov2 names the YAML uses for some fields.
_CONFIG_KEY_ALIASES = {
    "global_crops_size": "global_crop_size",
    "local_crops_size": "local_crop_size",
    "local_crops_number": "n_local_crops",
    "global_crops_scale": "global_crop_scale",
    "local_crops_scale": "local_crop_scale",
}
_FIELD_CONFIG_KEYS = {field_name: key for key, field_name in _CONFIG_KEY_ALIASES.items()}


def _config_key(name: str) -> str:
    return _FIELD_CONFIG_KEYS.get(name, name)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(name: str, expected: str, value: Any) -> VoxelFMError:
    """The error for field ``name``, named by its key in the ``crops`` section."""
    return VoxelFMError(
        f"SSL config key 'crops.{_config_key(name)}' must be {expected}, got {value!r}"
    )


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

    def __init__(self, settings: MultiCropSettings):
        self.settings = settings

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
        local_size = self.settings.local_crop_size
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
        settings = self.settings
        global_crops = tuple(
            self._plan_crop(
                volume_shape,
                rng,
                output_size=settings.global_crop_size,
                scale_range=settings.global_crop_scale,
                flip_probability=settings.global_flip_probability,
                window_probability=window_probability,
            )
            for window_probability in settings.global_window_probability
        )
        local_crops = tuple(
            self._plan_crop(
                volume_shape,
                rng,
                output_size=settings.local_crop_size,
                scale_range=settings.local_crop_scale,
                flip_probability=settings.local_flip_probability,
                window_probability=0.0,
            )
            for _ in range(settings.n_local_crops)
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
        settings = self.settings
        start, size = sample_region(
            volume_shape, scale_range, settings.reference_extent, settings.aspect_ratio_range, rng
        )
        axis_order = _IDENTITY
        if rng.random() < settings.axis_permutation_probability:
            axis_order = _NON_IDENTITY_ORDERS[int(rng.integers(len(_NON_IDENTITY_ORDERS)))]
        flip_axes = tuple(int(axis) for axis in np.flatnonzero(rng.random(3) < flip_probability))
        window = None
        if window_probability > 0 and rng.random() < window_probability:
            window = WindowDraw(
                level_offset=settings.window_level_jitter * rng.standard_normal(),
                width=rng.uniform(*settings.window_width_range),
            )
        noise_seed = int(rng.integers(2**63)) if settings.noise_std > 0 else None
        return CropPlan(start, size, output_size, axis_order, flip_axes, window, noise_seed)

    def render(self, store: CropSource, scan_id: str, plan: CropPlan) -> torch.Tensor:
        """Read the planned region and turn it into a (1, S, S, S) float32 network input."""
        return self.render_region(store.read_crop(scan_id, plan.start, plan.size), plan)

    def render_region(self, region: np.ndarray, plan: CropPlan) -> torch.Tensor:
        """(1, S, S, S) float32 network input from the int16 (nx, ny, nz) planned region."""
        settings = self.settings
        hu = torch.from_numpy(region.astype(np.float32))[None, None]  # (1, 1, nx, ny, nz)
        side = plan.output_size
        hu = F.interpolate(hu, size=(side, side, side), mode="trilinear", align_corners=False)
        hu = hu[0, 0].permute(plan.axis_order)  # (S, S, S)
        if plan.flip_axes:
            hu = hu.flip(plan.flip_axes)
        if plan.window is not None:
            hu = _clip_to_random_window(hu, plan.window, settings)
        if plan.noise_seed is not None:
            noise = np.random.default_rng(plan.noise_seed).standard_normal(hu.shape, np.float32)
            hu = hu + settings.noise_std * torch.from_numpy(noise)
        hu = standardise_hu(
            hu, settings.hu_clip, settings.normalisation_mean, settings.normalisation_std
        )
        return hu.contiguous()[None]


def _clip_to_random_window(
    hu: torch.Tensor, window: WindowDraw, settings: MultiCropSettings
) -> torch.Tensor:
    """Clip (S, S, S) HU to a window placed relative to the crop's own HU distribution."""
    low, high = settings.hu_clip
    # Every second voxel per axis: the quantiles barely move and cost an eighth.
    values = hu.numpy()[::2, ::2, ::2]
    # Air below the clip range (and HU_MIN padding) would drag every window toward -1000.
    values = values[(values >= low) & (values <= high)]
    if values.size == 0:
        return hu
    p01, q1, median, q3, p99 = np.quantile(values, _WINDOW_QUANTILES)
    spread = q3 - q1 if q3 - q1 >= 1.0 else max(p99 - p01, 1.0)
    level = median + window.level_offset * spread
    width = max(window.width * spread, settings.min_window_width)
    return hu.clamp(float(level - width / 2), float(level + width / 2))
