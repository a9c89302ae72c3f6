"""Shared plumbing of the foreign-model adapters (Merlin, CT-FM, RadFM, M3D-CLIP, CT-CLIP).

What every adapter needs and would otherwise repeat:

* :func:`foreign_options` - the config options every adapter accepts (``path``,
  ``random_weights``, ``name``, ``device``, ``spacing_mm``) plus its own, checked.
* :func:`build_encoder_model` - the encoder built under the config's seed (the global RNG
  untouched, so random-weights controls are reproducible), then its weights loaded unless
  ``random_weights``.
* :func:`load_release_state_dict` / :func:`load_encoder_weights` - weights from a local file
  only (``torch.load(weights_only=True)`` or safetensors), the release's key prefixes
  stripped, its other towers ignored, then ``load_state_dict(strict=True)`` with a one-line
  error naming the model, the file and the first missing/unexpected keys.
* :class:`AxisMap`, :func:`center_pad_or_crop`, :func:`resize_to`, :func:`valid_box` - the
  geometry of "our canonical (X, Y, Z) volume -> the model's fixed-size input", recorded per
  model axis as an affine map of voxel coordinates so that a model's feature map can be
  sampled back onto our cubic patch grid (:func:`sample_feature_grid`).
* :class:`ForeignExtractor` - a ``FeatureExtractor`` base: device, precision (bf16 autocast
  on CUDA), provenance (weights sha256 or the random-weights label) in ``describe()``.

Geometry convention (used by :class:`AxisMap`): continuous voxel coordinates with voxel
``i`` centred at ``i`` (``F.interpolate(align_corners=False)`` / MONAI conventions). A model
axis ``j`` is fed from our axis ``source`` by a chain of flip, resize and centre pad/crop;
each step is affine, so model coordinate ``m = scale * v + shift`` for our coordinate ``v``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.interface import (
    FeatureExtractor,
    backbone_options,
    file_sha256,
    parse_spacing_mm,
    resolve_device,
)
from voxelfm.utils.jsonable import to_jsonable

RANDOM_WEIGHTS_LABEL = "random (NOT the released model)"
COMMON_OPTIONAL = ("path", "random_weights", "name", "device", "spacing_mm")

# Containers a release may wrap its state dict in (checked in this order, repeatedly).
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "network")


# --- config options -------------------------------------------------------------------------


def foreign_options(
    config: Mapping[str, Any], model: str, *, optional: Iterable[str] = ()
) -> dict[str, Any]:
    """The config's options checked: ``path`` is required unless ``random_weights`` is true.

    Args:
        config: the backbone's config (with ``kind``).
        model: the model's display name for messages ("Merlin").
        optional: the adapter's own option names, beyond :data:`COMMON_OPTIONAL`.

    Returns:
        the options (without ``kind``); ``random_weights`` normalised to a bool.
    """
    options = backbone_options(config, required=(), optional=(*COMMON_OPTIONAL, *optional))
    random_weights = options.get("random_weights", False)
    if not isinstance(random_weights, bool):
        raise VoxelFMError(f"{model}: random_weights must be true or false, got {random_weights!r}")
    options["random_weights"] = random_weights
    if random_weights and "path" in options:
        raise VoxelFMError(f"{model}: give either 'path' or 'random_weights: true', not both")
    if not random_weights and "path" not in options:
        raise VoxelFMError(
            f"{config.get('kind')} backbone config is missing path (the {model} weight file; "
            "or random_weights: true for an untrained control)"
        )
    return options


def spacing_option(options: Mapping[str, Any], default: Sequence[float] | None):
    """``spacing_mm`` from the config, else the model's own default (None = any)."""
    value = options.get("spacing_mm", default)
    return parse_spacing_mm(value)


# --- weights ----------------------------------------------------------------------------------


def read_weight_file(path: str | os.PathLike, model: str, download_hint: str) -> dict[str, Tensor]:
    """A flat ``{key: tensor}`` from a local ``.safetensors`` / torch file (weights only).

    ``download_hint`` completes "<model> weights not found; download ..." for a missing file.
    Wrappers such as ``{"state_dict": ...}`` or ``{"model": ...}`` are unwrapped.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise InputError(
            path,
            f"{model} weights not found; download {download_hint} (see docs/foreign_backbones.md)",
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            from voxelfm.models.weights import load_torch_file

            state = load_torch_file(path)  # one safe loader; never hints at unsafe loading
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001  (any unreadable file is one user-facing line)
        raise InputError(path, f"{model}: cannot read weights: {type(error).__name__}: {error}")
    for _ in range(3):
        if not isinstance(state, Mapping):
            break
        wrapper = next((key for key in _STATE_DICT_WRAPPERS if key in state), None)
        if wrapper is None or not isinstance(state[wrapper], Mapping):
            break
        state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(path, f"{model}: not a state dict of tensors")
    return dict(state)


def select_state_dict(
    state: Mapping[str, Tensor],
    *,
    prefixes: Sequence[str] = (),
    ignore_prefixes: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Keys of the image encoder, with the release's prefixes removed.

    Keys starting with any of ``ignore_prefixes`` (text tower, heads...) are dropped first;
    then every leading occurrence of a prefix in ``prefixes`` is stripped, repeatedly
    (so ``module.encoder.x`` loses both ``module.`` and ``encoder.`` when both are given).
    Keys that match no prefix are kept unchanged.
    """
    selected = {}
    for key, value in state.items():
        if any(key.startswith(prefix) for prefix in ignore_prefixes):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if prefix and key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        selected[key] = value
    return selected


def load_encoder_weights(
    module: torch.nn.Module,
    path: str | os.PathLike,
    *,
    model: str,
    download_hint: str,
    prefixes: Sequence[str] = (),
    ignore_prefixes: Sequence[str] = (),
    show: int = 3,
) -> str:
    """Load a release's weights into ``module`` strictly; returns the file's sha256.

    Raises InputError (one line, naming the model and file) for a missing/unreadable file
    or when keys or shapes do not match: the first ``show`` missing / unexpected keys.
    """
    state = select_state_dict(
        read_weight_file(path, model, download_hint),
        prefixes=prefixes,
        ignore_prefixes=ignore_prefixes,
    )
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:show])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:show])})")
        raise InputError(path, f"not {model} image-encoder weights: {'; '.join(parts)}")
    wrong = [key for key in expected if tuple(state[key].shape) != tuple(expected[key].shape)]
    if wrong:
        key = wrong[0]
        raise InputError(
            path,
            f"not {model} image-encoder weights of this configuration: {len(wrong)} shape "
            f"mismatches (e.g. {key}: file {tuple(state[key].shape)}, "
            f"model {tuple(expected[key].shape)})",
        )
    module.load_state_dict(state, strict=True)
    return file_sha256(Path(os.path.expanduser(str(path))))


# --- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisMap:
    """One model input axis: fed from our axis ``source``; model coord = scale * ours + shift."""

    source: int
    scale: float = 1.0
    shift: float = 0.0

    def flipped(self, size: int) -> AxisMap:
        """After reversing an axis of ``size`` voxels: m' = size - 1 - m."""
        return replace(self, scale=-self.scale, shift=size - 1 - self.shift)

    def resized(self, size_in: int, size_out: int) -> AxisMap:
        """After ``F.interpolate(align_corners=False)`` from size_in to size_out voxels."""
        k = size_out / size_in
        return replace(self, scale=self.scale * k, shift=(self.shift + 0.5) * k - 0.5)

    def moved(self, offset: float) -> AxisMap:
        """After padding ``offset`` voxels before (negative: cropping them)."""
        return replace(self, shift=self.shift + offset)

    def __call__(self, ours: Tensor | float) -> Tensor | float:
        return self.scale * ours + self.shift


def identity_maps(order: Sequence[int] = (0, 1, 2)) -> list[AxisMap]:
    """Model axis j <- our axis order[j], no scaling yet (e.g. (2, 1, 0) for Z, Y, X)."""
    return [AxisMap(source=int(axis)) for axis in order]


def center_offset(size_in: int, size_out: int) -> int:
    """Voxels padded before (>0) or cropped before (<0) by MONAI's ResizeWithPadOrCrop.

    MONAI's ``SpatialPad`` (method "symmetric") pads ``diff // 2`` before; its
    ``CenterSpatialCrop`` starts at ``size_in // 2 - size_out // 2``.
    """
    if size_in <= size_out:
        return (size_out - size_in) // 2
    return -(size_in // 2 - size_out // 2)


def center_pad_or_crop(
    x: Tensor, size: Sequence[int], value: float, maps: list[AxisMap] | None = None
) -> Tensor:
    """(..., a, b, c) -> (..., *size), centred as MONAI's ResizeWithPadOrCrop; maps updated."""
    spatial = x.shape[-3:]
    for axis, (n_in, n_out) in enumerate(zip(spatial, size)):
        offset = center_offset(int(n_in), int(n_out))
        dim = x.dim() - 3 + axis
        if offset < 0 or n_in > n_out:
            x = x.narrow(dim, -offset, int(n_out))
        elif n_out > n_in:
            pad = [0, 0] * 3
            index = 2 * (2 - axis)  # F.pad lists the last axis first
            pad[index], pad[index + 1] = offset, int(n_out) - int(n_in) - offset
            x = F.pad(x, pad, value=value)
        if maps is not None:
            maps[axis] = maps[axis].moved(offset)
    return x


def resize_to(
    x: Tensor, size: Sequence[int], maps: list[AxisMap] | None = None, mode: str = "trilinear"
) -> Tensor:
    """(B, C, a, b, c) -> (B, C, *size) by ``F.interpolate`` (align_corners=False)."""
    size = tuple(int(n) for n in size)
    if maps is not None:
        for axis, (n_in, n_out) in enumerate(zip(x.shape[-3:], size)):
            maps[axis] = maps[axis].resized(int(n_in), n_out)
    if tuple(x.shape[-3:]) == size:
        return x
    return F.interpolate(
        x, size=size, mode=mode, align_corners=False if mode != "nearest" else None
    )


def valid_box(valid: Tensor | None, shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """Bounding box of the real voxels of one (1, X, Y, Z) or (X, Y, Z) mask (all if None).

    Our extraction pads at the high end to a multiple of the patch size; cropping the box
    first makes a model's centre crop/pad see the volume exactly as its own pipeline would.
    """
    if valid is None:
        return tuple(slice(0, int(n)) for n in shape)  # type: ignore[return-value]
    mask = valid.reshape(valid.shape[-3:]).bool()
    if not bool(mask.any()):
        return tuple(slice(0, int(n)) for n in shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = torch.nonzero(mask.any(dim=other)).flatten()
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def foreground_box(x: Tensor, above: float = 0.0) -> tuple[slice, slice, slice]:
    """MONAI ``CropForeground``'s box (voxels > ``above``, margin 0) of an (a, b, c) array;
    the whole array when no voxel qualifies (MONAI then keeps the image)."""
    inside = x > above
    if not bool(inside.any()):
        return tuple(slice(0, int(n)) for n in x.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = torch.nonzero(inside.any(dim=other)).flatten()
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def sample_feature_grid(
    features: Tensor,
    maps: Sequence[AxisMap],
    model_input: Sequence[int],
    grid: Sequence[int],
    patch_size: int,
) -> Tensor:
    """A model's feature map resampled onto our cubic patch grid.

    Args:
        features: (C, f0, f1, f2) feature map in model axis order, covering the model input
            of ``model_input`` voxels (feature cell i centred on input (i + 0.5) * s - 0.5).
        maps: per model axis, our voxel coordinate -> model input coordinate.
        model_input: (n0, n1, n2) model input size.
        grid: (gx, gy, gz) our token grid; token (i, j, k) covers our voxels
            ``[i*p, (i+1)*p)`` per axis (the maps start from these voxel coordinates).
        patch_size: p.

    Returns:
        (gx, gy, gz, C): trilinear samples of the feature map at the token centres (feature
        cells beyond the model input's edge repeat the border).
    """
    device = features.device
    centres = [
        torch.arange(int(grid[axis]), device=device, dtype=torch.float64) * patch_size
        + (patch_size - 1) / 2
        for axis in range(3)
    ]
    # Normalised coordinate (align_corners=False) per model axis, on our (gx, gy, gz) grid.
    coords = []
    for model_axis, axis_map in enumerate(maps):
        m = axis_map(centres[axis_map.source])
        g = 2 * (m + 0.5) / int(model_input[model_axis]) - 1
        view = [1, 1, 1]
        view[axis_map.source] = -1
        coords.append(g.reshape(view).expand(*(int(n) for n in grid)))
    # grid_sample's last dimension lists (W, H, D) = model axes (2, 1, 0).
    sampling = torch.stack(coords[::-1], dim=-1).to(features.dtype)[None]
    sampled = F.grid_sample(
        features[None], sampling, mode="bilinear", padding_mode="border", align_corners=False
    )[0]  # (C, gx, gy, gz)
    return sampled.permute(1, 2, 3, 0).contiguous()


# --- extractor base ---------------------------------------------------------------------------


class ForeignExtractor(FeatureExtractor):
    """Base of the adapters: subclasses set ``kind`` and implement ``forward``.

    ``self.autocast()`` gives bf16 autocast on CUDA when precision is "bf16" (else nothing);
    ``describe()`` adds ``model``, ``weights`` (sha256 of the file, or
    :data:`RANDOM_WEIGHTS_LABEL`), ``weights_path``, ``precision`` and ``preprocessing``.
    """

    def __init__(
        self,
        *,
        name: str,
        config: Mapping[str, Any],
        device: torch.device,
        precision: str,
        embed_dim: int,
        patch_size: int | None,
        spacing_mm: tuple[float, float, float] | None,
        model_name: str,
        weights_sha256: str | None,
        preprocessing: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.config = dict(config)  # FeatureExtractor's name for it (describe(), stores)
        self.device = device
        self.precision = precision if device.type == "cuda" else "fp32"
        self.embed_dim = int(embed_dim)
        self.patch_size = None if patch_size is None else int(patch_size)
        self.spacing_mm = spacing_mm
        self.model_name = model_name
        self.weights_sha256 = weights_sha256
        self.preprocessing = dict(preprocessing or {})
        self.extra = dict(extra or {})

    def _extra_description(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "weights": self.weights_sha256 or RANDOM_WEIGHTS_LABEL,
            "weights_path": self.config.get("path"),
            "precision": self.precision,
            "preprocessing": to_jsonable(self.preprocessing),
            **to_jsonable(self.extra),
        }


def extractor_device(options: Mapping[str, Any], device: torch.device) -> torch.device:
    """The config's ``device`` option (if any) overrides the one build_extractor resolved."""
    if "device" not in options or options["device"] is None:
        return device
    return resolve_device(options["device"])


# --- building an adapter --------------------------------------------------------------------


def build_encoder_model(
    options: Mapping[str, Any],
    kind: str,
    construct: Callable[[], torch.nn.Module],
    *,
    load: Callable[[torch.nn.Module, Any], str],
) -> tuple[torch.nn.Module, str | None]:
    """An adapter's encoder: built under ``options["seed"]`` (default 0), then loaded.

    The construction forks the CPU RNG, so a random-weights control is the same model
    whatever ran before it, and the caller's random state is left as it was. A constructor's
    TypeError / ValueError / KeyError (an architecture override it does not take) becomes a
    one-line error naming ``kind``.

    Args:
        options: checked by :func:`foreign_options`.
        kind: the backbone kind, for messages.
        construct: builds the model (the architecture bound in, e.g. with functools.partial).
        load: ``(model, path) -> sha256 of the file``, loading the release's weights
            (:func:`load_encoder_weights` with the adapter's prefixes, or its own loader).

    Returns:
        the model and the weight file's sha256 (None for random weights).
    """
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise VoxelFMError(f"{kind}: seed must be an integer, got {seed!r}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = construct()
    except (TypeError, ValueError, KeyError) as error:
        raise VoxelFMError(f"{kind}: bad architecture option: {error}") from error
    if options["random_weights"]:
        return model, None
    return model, load(model, options["path"])
