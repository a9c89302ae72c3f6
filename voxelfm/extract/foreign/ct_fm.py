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
map (stride 16 voxels of the model input) sampled at the centres of our patches through the
preprocessing geometry (trilinear, border cells repeated). Token (i, j, k) is exactly the
feature cell over our voxels [16i, 16i+16) x ... only when the model input is our grid
unchanged and anchored alike: ``patch_size`` 16, no foreground crop, the volume already at
the model's spacing, and X and Y multiples of 16 (SPL reverses X and Y, so the model's cells
start at our high end of those axes; our extraction pads only the high end and that padding
is cut off before the model sees the volume). Otherwise tokens interpolate between cells.

Preprocessing, ``preprocessing: pretraining`` (default) - CT-FM's own pre-training and
feature-extraction recipe (project-lighter/CT-FM ``experiments/fm/base.yaml`` ``SPACING:
[3, 1, 1]``, ``experiments/fm/frameworks/intrasample_simclr.yaml`` and
``scripts/feature_extractor.py``): ``Orientation(axcodes="SPL")`` - array axes (Superior,
Posterior, Left), i.e. our (Z, Y, X) with Y and X reversed; ``Spacing(pixdim=[3, 1, 1],
mode="bilinear")`` in SPL order, i.e. (1.0, 1.0, 3.0) mm on our (X, Y, Z) (the extractor's
``spacing_mm``, so our extraction resamples files there; volumes given at another
``spacing_mm`` are resized trilinearly in ``forward``, new length ``round(n * ours /
target)``); ``CropForeground()`` on the raw HU (MONAI's default ``select_fn``: HU > 0, margin
0); then ``ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True)``.

``preprocessing: model_card`` - the example on the Hugging Face card of
``project-lighter/ct_fm_feature_extractor``: SPL orientation, the intensity scaling first,
then ``CropForeground()`` on the scaled image (> 0, i.e. HU > -1024), no resampling
(``spacing_mm`` defaults to None: our store's grid).

``crop_foreground: false`` skips the crop in either variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor

from voxelfm.errors import VoxelFMError
from voxelfm.extract.foreign.common import (
    AxisMap,
    ForeignExtractor,
    build_encoder_model,
    extractor_device,
    foreground_box,
    foreign_options,
    load_encoder_weights,
    resize_to,
    sample_feature_grid,
    spacing_option,
    valid_box,
)

MODEL = "CT-FM"
HU_WINDOW = (-1024.0, 2048.0)
# Pre-training voxel size: SPACING [3, 1, 1] in (S, P, L) order = (L, P, S) (1, 1, 3) mm on
# our (X, Y, Z) axes.
PRETRAINING_SPACING_XYZ = (1.0, 1.0, 3.0)
# CropForeground keeps voxels above these (MONAI's default select_fn, x > 0): on the raw HU in
# the pre-training recipe (cropped before scaling), on the scaled image in the model card's.
FOREGROUND_ABOVE_HU = {"pretraining": 0.0, "model_card": HU_WINDOW[0]}
PREPROCESSING = tuple(FOREGROUND_ABOVE_HU)
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


def scale_intensity(hu: Tensor) -> Tensor:
    """``ScaleIntensityRange(-1024, 2048, 0, 1, clip=True)``."""
    low, high = HU_WINDOW
    return (hu.clamp(low, high) - low) / (high - low)


def to_spl(hu: Tensor) -> Tensor:
    """(..., X, Y, Z) -> (..., S, P, L): our (Z, Y, X) with Y and X reversed."""
    return hu.transpose(-1, -3).flip(-2, -1)


def preprocess(hu: Tensor) -> Tensor:
    """(1, X, Y, Z) canonical HU -> (1, S, P, L) CT-FM input in [0, 1] (no crop, no resize)."""
    return to_spl(scale_intensity(hu))


def resampled_length(n: int, ours_mm: float, target_mm: float) -> int:
    """Voxels along an axis of ``n`` voxels at ``ours_mm`` once resampled to ``target_mm``."""
    return max(1, round(n * ours_mm / target_mm))


class CTFMExtractor(ForeignExtractor):
    """CT-FM SegResEncoder: pooled last stage and its feature map as patch tokens."""

    kind = "ct_fm"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        preprocessing_variant: str,
        crop_foreground: bool,
        patch_size: int,
        **base: Any,
    ) -> None:
        dim = int(model.init_filters * 2 ** (len(model.blocks_down) - 1))
        super().__init__(embed_dim=dim, patch_size=patch_size, model_name=MODEL, **base)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.variant = preprocessing_variant
        self.crop_foreground = bool(crop_foreground)
        self.stride = 2 ** (len(model.blocks_down) - 1)
        # The pre-training recipe resamples to its spacing; the model card keeps the grid.
        self.model_spacing = PRETRAINING_SPACING_XYZ if self.variant == "pretraining" else None

    def prepare(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, list[AxisMap]]:
        """(1, X, Y, Z) HU of one sample -> (1, S, P, L) model input, and the maps of our
        voxel coordinates onto its axes (see the module docstring for the steps)."""
        shape = hu.shape[-3:]
        box = valid_box(valid, shape)
        sizes = [b.stop - b.start for b in box]
        # Model axes (S, P, L) <- our (Z, Y reversed, X reversed) of the box.
        maps = [
            AxisMap(source=2, shift=-box[2].start),
            AxisMap(source=1, shift=-box[1].start).flipped(sizes[1]),
            AxisMap(source=0, shift=-box[0].start).flipped(sizes[0]),
        ]
        x = to_spl(hu[(slice(None), *box)])
        ours = self.spacing_mm
        if self.model_spacing is not None and ours is not None:
            size = [
                resampled_length(int(n), ours[m.source], self.model_spacing[m.source])
                for n, m in zip(x.shape[-3:], maps)
            ]
            x = resize_to(x[None], size, maps)[0]  # MONAI Spacing "bilinear" = trilinear
        if self.crop_foreground:
            above = FOREGROUND_ABOVE_HU[self.variant]
            crop = foreground_box(x[0], above)
            x = x[(slice(None), *crop)]
            maps = [m.moved(-c.start) for m, c in zip(maps, crop)]
        return scale_intensity(x), maps

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        hu = hu.to(self.device, torch.float32)
        batch, _, *shape = hu.shape
        p = int(self.patch_size)
        grid = [n // p for n in shape]
        cls, patch = [], []
        for row in range(batch):  # crops differ per sample, so samples run one at a time
            x, maps = self.prepare(hu[row], None if valid is None else valid[row])
            with self.autocast():
                features = self.model(x[None])[-1][0].float()  # (512, s, p, l)
            cls.append(features.mean(dim=(1, 2, 3)))
            # A stride-2 conv with padding 1 gives ceil(n / 2): the map spans cells * stride.
            span = [n * self.stride for n in features.shape[1:]]
            patch.append(sample_feature_grid(features, maps, span, grid, p))
        return torch.stack(cls), torch.stack(patch)

    def _extra_description(self) -> dict[str, Any]:
        return {
            **super()._extra_description(),
            "preprocessing_variant": self.variant,
            "crop_foreground": self.crop_foreground,
        }


def build_ct_fm(config: Mapping[str, Any], device: torch.device, precision: str) -> CTFMExtractor:
    """Config options: path | random_weights, name, device, preprocessing (``pretraining``
    default | ``model_card``), spacing_mm (default (1, 1, 3) for pretraining, None for
    model_card), crop_foreground (true), patch_size (16), overrides (SegResEncoder
    arguments, for tests), seed."""
    options = foreign_options(
        config,
        MODEL,
        optional=("preprocessing", "crop_foreground", "patch_size", "overrides", "seed"),
    )
    variant = options.get("preprocessing", "pretraining")
    if variant not in PREPROCESSING:
        raise VoxelFMError(
            f"ct_fm: preprocessing must be one of {', '.join(PREPROCESSING)}, got {variant!r}"
        )
    crop = options.get("crop_foreground", True)
    if not isinstance(crop, bool):
        raise VoxelFMError(f"ct_fm: crop_foreground must be true or false, got {crop!r}")
    model, sha = build_encoder_model(
        options,
        "ct_fm",
        partial(build_encoder, **dict(options.get("overrides") or {})),
        load=partial(
            load_encoder_weights,
            model=MODEL,
            download_hint=DOWNLOAD_HINT,
            prefixes=PREFIXES,
            ignore_prefixes=IGNORE_PREFIXES,
        ),
    )
    pretraining = variant == "pretraining"
    spacing = spacing_option(options, PRETRAINING_SPACING_XYZ if pretraining else None)
    crop_text = f"CropForeground on HU > {FOREGROUND_ABOVE_HU[variant]:g}" if crop else "none"
    return CTFMExtractor(
        model,
        preprocessing_variant=variant,
        crop_foreground=crop,
        patch_size=int(options.get("patch_size", 16)),
        name=options.get("name", "ct_fm"),
        config=config,
        device=extractor_device(options, device),
        precision=precision,
        spacing_mm=spacing,
        weights_sha256=sha,
        preprocessing={
            "variant": variant,
            "orientation": "SPL (our Z, Y reversed, X reversed)",
            "resample": (
                f"to {list(PRETRAINING_SPACING_XYZ)} mm on (X, Y, Z) (SPL [3, 1, 1])"
                if pretraining
                else "none (the model card feeds the native grid)"
            ),
            "crop": crop_text + (" (raw HU, before scaling)" if crop and pretraining else ""),
            "hu_window": list(HU_WINDOW),
            "scale": "[0, 1]",
            "source": (
                "project-lighter/CT-FM experiments/fm (pre-training) and "
                "scripts/feature_extractor.py"
                if pretraining
                else "model card of project-lighter/ct_fm_feature_extractor"
            ),
        },
    )
