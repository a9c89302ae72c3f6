"""CT-FM (Pai et al. 2025, AIM Harvard; project-lighter) behind our extractor API.

Architecture: MONAI's ``SegResEncoder`` (``monai.networks.nets.segresnet_ds``), as the
release ``project-lighter/ct_fm_feature_extractor`` builds it (lighter-zoo ``SegResEncoder``
= the MONAI class + a Hugging Face mixin; its ``config.json`` lists ``spatial_dims 3,
in_channels 1, init_filters 32, blocks_down [1, 2, 2, 4, 4]``; everything else is MONAI's
default: ReLU, batch norm). Five stages with 32, 64, 128, 256, 512 channels at strides
1, 2, 4, 8, 16; about 77.8 M parameters. The released ``model.safetensors`` has the MONAI
keys as they are (``conv_init.weight``, ``layers.0.blocks.0.conv1.weight``, ...); the
full-SegResNet release ``ct_fm_segresnet`` prefixes them with ``encoder.`` (its decoder keys
are ignored here).

Embedding: the last stage (512 channels) average-pooled over space, as the model card's
feature-extraction example (``adaptive_avg_pool3d(x[-1], 1)``) does. Patch tokens: that stage's
map (stride 16 voxels) mapped back onto our grid; with ``patch_size`` 16 (default) and no
foreground crop, token (i, j, k) is exactly the feature cell covering our voxels
[16i, 16i+16) x ... (a permutation and flips of the model's grid); after a foreground crop
the map is resampled through the crop geometry (trilinear, border cells repeated).

Preprocessing (model card of ``project-lighter/ct_fm_feature_extractor``, MONAI transforms):
``Orientation(axcodes="SPL")`` - array axes (Superior, Posterior, Left), i.e. our (Z, Y, X)
with Y and X reversed; ``ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1,
clip=True)``; ``CropForeground()`` (bounding box of voxels > 0 after scaling, i.e. HU > -1024;
option ``crop_foreground``, default true). The card does not resample: CT-FM takes the
volume at the spacing it has, so ``spacing_mm`` defaults to None (our store's default grid)
and may be set in the spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from voxelfm.errors import VoxelFMError
from voxelfm.extract.backbones import register_backbone
from voxelfm.extract.foreign.common import (
    AxisMap,
    ForeignExtractor,
    extractor_device,
    foreign_options,
    load_encoder_weights,
    sample_feature_grid,
    spacing_option,
    valid_box,
)

MODEL = "CT-FM"
HU_WINDOW = (-1024.0, 2048.0)
ARCHITECTURE = {
    "spatial_dims": 3,
    "in_channels": 1,
    "init_filters": 32,
    "blocks_down": (1, 2, 2, 4, 4),
}
DOWNLOAD_HINT = (
    "model.safetensors of the Hugging Face repository project-lighter/ct_fm_feature_extractor"
)
PREFIXES = ("module.", "model.", "backbone.", "trunk.", "encoder.")
IGNORE_PREFIXES = ("up_layers.", "model.up_layers.", "head.", "decoder.")


def build_encoder(**overrides: Any) -> torch.nn.Module:
    """MONAI SegResEncoder with CT-FM's constructor arguments (``overrides`` for tests)."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    arguments = {**ARCHITECTURE, **overrides}
    arguments["blocks_down"] = tuple(arguments["blocks_down"])
    return SegResEncoder(**arguments)


def preprocess(hu: Tensor) -> Tensor:
    """(1, X, Y, Z) canonical HU -> (1, S, P, L) CT-FM input in [0, 1]."""
    low, high = HU_WINDOW
    x = (hu.clamp(low, high) - low) / (high - low)
    return x.permute(0, 3, 2, 1).flip(2, 3)  # (Z, Y, X) then A->P and R->L


def foreground_box(hu: Tensor, box: tuple[slice, slice, slice]) -> tuple[slice, slice, slice]:
    """MONAI CropForeground's box (voxels > a_min after scaling, margin 0) within ``box``."""
    inside = hu.reshape(hu.shape[-3:])[box] > HU_WINDOW[0]
    if not bool(inside.any()):
        return box
    result = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = torch.nonzero(inside.any(dim=other)).flatten()
        start = box[axis].start
        result.append(slice(start + int(hits[0]), start + int(hits[-1]) + 1))
    return tuple(result)  # type: ignore[return-value]


class CTFMExtractor(ForeignExtractor):
    """CT-FM SegResEncoder: pooled last stage and its feature map as patch tokens."""

    kind = "ct_fm"

    def __init__(
        self, model: torch.nn.Module, *, crop_foreground: bool, patch_size: int, **base: Any
    ) -> None:
        dim = int(model.init_filters * 2 ** (len(model.blocks_down) - 1))
        super().__init__(embed_dim=dim, patch_size=patch_size, model_name=MODEL, **base)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.crop_foreground = bool(crop_foreground)
        self.stride = 2 ** (len(model.blocks_down) - 1)

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        hu = hu.to(self.device, torch.float32)
        batch, _, *shape = hu.shape
        p = int(self.patch_size)
        grid = [n // p for n in shape]
        cls, patch = [], []
        for row in range(batch):  # crops differ per sample, so samples run one at a time
            box = valid_box(None if valid is None else valid[row], shape)
            if self.crop_foreground:
                box = foreground_box(hu[row], box)
            sizes = [b.stop - b.start for b in box]
            # Model axes (S, P, L) <- our (Z, Y reversed, X reversed) of the cropped box.
            maps = [
                AxisMap(source=2, shift=-box[2].start),
                AxisMap(source=1, shift=-box[1].start).flipped(sizes[1]),
                AxisMap(source=0, shift=-box[0].start).flipped(sizes[0]),
            ]
            x = preprocess(hu[row][(slice(None), *box)])[None]
            with self.autocast():
                features = self.model(x)[-1][0].float()  # (512, s, p, l)
            cls.append(features.mean(dim=(1, 2, 3)))
            # A stride-2 conv with padding 1 gives ceil(n / 2): the map spans cells * stride.
            span = [n * self.stride for n in features.shape[1:]]
            patch.append(sample_feature_grid(features, maps, span, grid, p))
        return torch.stack(cls), torch.stack(patch)

    def _extra_description(self) -> dict[str, Any]:
        return {**super()._extra_description(), "crop_foreground": self.crop_foreground}


@register_backbone("ct_fm")
def build_ct_fm(spec: Mapping[str, Any], device: torch.device, precision: str) -> CTFMExtractor:
    """Spec options: path | random_weights, name, device, spacing_mm (None), crop_foreground
    (true), patch_size (16), architecture (SegResEncoder overrides, for tests), seed."""
    options = foreign_options(
        spec, MODEL, optional=("crop_foreground", "patch_size", "overrides", "seed")
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(options.get("seed", 0)))
            model = build_encoder(**dict(options.get("overrides") or {}))
    except (TypeError, ValueError, KeyError) as error:
        raise VoxelFMError(f"ct_fm: bad architecture option: {error}") from error
    sha = None
    if not options["random_weights"]:
        sha = load_encoder_weights(
            model,
            options["path"],
            model=MODEL,
            download_hint=DOWNLOAD_HINT,
            prefixes=PREFIXES,
            ignore_prefixes=IGNORE_PREFIXES,
        )
    crop = options.get("crop_foreground", True)
    if not isinstance(crop, bool):
        raise VoxelFMError(f"ct_fm: crop_foreground must be true or false, got {crop!r}")
    return CTFMExtractor(
        model,
        crop_foreground=crop,
        patch_size=int(options.get("patch_size", 16)),
        name=options.get("name", "ct_fm"),
        spec=spec,
        device=extractor_device(options, device),
        precision=precision,
        spacing_mm=spacing_option(options, None),
        weights_sha256=sha,
        preprocessing={
            "orientation": "SPL (our Z, Y reversed, X reversed)",
            "hu_window": list(HU_WINDOW),
            "scale": "[0, 1]",
            "crop_foreground": crop,
            "resample": "none (the model card feeds the native grid)",
            "source": "model card of project-lighter/ct_fm_feature_extractor",
        },
    )
