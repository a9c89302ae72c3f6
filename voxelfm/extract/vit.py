"""The vision-transformer backbones: our exported teacher, the published checkpoint and the
random-initialisation control, all one 3D ViT read out as its final-norm CLS token and patch
tokens.

Kinds (config keys beside ``kind``; ``name`` and ``spacing_mm`` as every kind, see
``voxelfm.extract.backbones``):

``voxelfm``: our exported teacher backbone (``voxelfm export``: safetensors + JSON sidecar).
    Normalisation is read from the training config stored in the sidecar (its ``crops``
    section, parsed by ``MultiCropSettings.from_config``), i.e. exactly what training used.
``published_voxelfm``: a reference-format checkpoint (``{"teacher": ...}`` or
    ``{"model": ...}``, see ``voxelfm.models.weights``). Options: ``preset`` ("base"),
    ``which`` ("teacher"), ``overrides`` (constructor options), ``normalisation``
    (``{"hu_clip": [lo, hi] | null, "mean": m, "std": s}``) and ``input_axes``.
    The normalisation defaults to the reference's training recipe (rmaguado/VoxelFM
    ``ssl_default_config.yaml`` ``datasets[0]``: pixel_range [-1000, 1900], norm mean
    -573.8, std 461.3, applied as clip-then-standardise by its ``Norm`` transform). The
    reference's own inference script (``dinov2/inference/processing.py``) standardises
    *without* the clip; ``"normalisation": {"hu_clip": null}`` reproduces that.
    ``input_axes`` "zyx" (default) feeds the canonical volume as (Z, Y, X), as the
    reference reads a RAS-stored NIfTI; "axial_display" as (Z, Y reversed, X reversed), as
    it reads an axial DICOM series; patch tokens are returned on the (X, Y, Z) grid always.
    ``preprocessing``: "canonical" (default: the volume as our extraction gives it, the
    normalisation above) or "reference" (the reference's embedding pipeline on our grid:
    loader clip [-1000, 1900], background crop, at most ``max_patches`` (25,000) patches,
    patch crop, unclipped standardisation, fp32; see ``voxelfm.extract.reference_pipeline``,
    whose ``reference_features`` runs it on a file exactly as the reference does).
    ``precision``: "fp32" or "bf16" for this backbone whatever the run's precision
    (default: the run's; "fp32" with ``preprocessing: reference``).
``random_init``: the same architecture as ``like`` (an exported backbone folder) or as
    ``preset`` + ``overrides``, with weights from the constructor's initialisation after
    ``torch.manual_seed(seed)`` (the global RNG is restored afterwards). Uses ``like``'s
    normalisation (else ``normalisation`` / the reference defaults), so it is the control
    for "what does pretraining add".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.interface import (
    PRECISIONS,
    FeatureExtractor,
    backbone_options,
    file_sha256,
    parse_spacing_mm,
)
from voxelfm.extract.normalisation import HUNormalisation, normalisation_from_config
from voxelfm.utils.jsonable import to_jsonable


class ViTExtractor(FeatureExtractor):
    """A VisionTransformer3D: final-norm CLS token and patch tokens."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        kind: str,
        name: str,
        config: Mapping[str, Any],
        device: torch.device,
        normalisation: HUNormalisation,
        input_axes: str = "xyz",
        precision: str = "fp32",
        spacing_mm: tuple[float, float, float] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        if input_axes not in INPUT_AXES:
            raise VoxelFMError(
                f"input_axes must be one of {', '.join(INPUT_AXES)}, got {input_axes!r}"
            )
        self.kind = kind  # type: ignore[misc]  # per-instance: one class serves three kinds
        self.name = name
        self.config = dict(config)
        self.device = device
        self.model = model.to(device).eval().requires_grad_(False)
        self.embed_dim = int(model.embed_dim)
        self.patch_size = int(model.patch_size)
        self.spacing_mm = spacing_mm
        self.normalisation = normalisation
        self.input_axes = input_axes
        # bf16 autocast only where it pays off; CPU extraction stays fp32.
        self.precision = precision if device.type == "cuda" else "fp32"
        self.provenance = dict(provenance or {})

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = to_input_axes(self.normalisation(hu.to(self.device, torch.float32)), self.input_axes)
        with self.autocast():
            out = self.model(x)
        cls = out.x_norm_clstoken.float()
        patch = out.patch_grid().float()  # (B, g0, g1, g2, D) in input axis order
        return cls, from_input_axes(patch, self.input_axes).contiguous()

    def _extra_description(self) -> dict[str, Any]:
        return {
            "architecture": to_jsonable(getattr(self.model, "architecture", {})),
            "normalisation": self.normalisation.to_dict(),
            "input_axes": self.input_axes,
            "precision": self.precision,
            **to_jsonable(self.provenance),
        }


PUBLISHED_PREPROCESSING = ("canonical", "reference")


class ReferenceViTExtractor(ViTExtractor):
    """The published ViT fed as the reference's embedding pipeline feeds it.

    Per volume: our extraction padding cut off (``valid``), axes as ``input_axes``, HU clipped
    to ``normalisation.hu_clip`` (the reference loader's clip), then the reference's
    background crop, patch budget (``max_patches``) and patch crop
    (:func:`voxelfm.extract.reference_pipeline.prepare_reference`; no isotropic resampling:
    our volumes are already on one grid), standardisation without a further clip, and the
    model. Its tokens lie on the cropped and shrunken grid; they are sampled back at the
    centres of our patches (trilinear, border tokens repeated outside the crop).
    """

    def __init__(
        self, model: torch.nn.Module, *, max_patches: int | None, crop_background: bool, **base: Any
    ) -> None:
        super().__init__(model, **base)
        self.max_patches = max_patches
        self.crop_background = crop_background

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        from voxelfm.extract.foreign.common import AxisMap, sample_feature_grid, valid_box
        from voxelfm.extract.reference_pipeline import prepare_reference

        hu = hu.to(self.device, torch.float32)
        batch, _, *shape = hu.shape
        p = int(self.patch_size)
        grid = [n // p for n in shape]
        order = (0, 1, 2) if self.input_axes == "xyz" else (2, 1, 0)
        cls, patch = [], []
        for row in range(batch):  # crops and budgets differ per volume
            box = valid_box(None if valid is None else valid[row], shape)
            x = to_input_axes(hu[row, 0][box], self.input_axes)
            maps = [AxisMap(source=axis, shift=-box[axis].start) for axis in order]
            if self.input_axes == "axial_display":
                maps[1] = maps[1].flipped(x.shape[1])
                maps[2] = maps[2].flipped(x.shape[2])
            clip = self.normalisation.hu_clip
            x = x if clip is None else x.clamp(*clip)
            x = prepare_reference(
                x,
                None,
                p,
                max_patches=self.max_patches,
                crop_background=self.crop_background,
                maps=maps,
                empty_ok=True,  # a sliding window may hold only air
            )
            x = (x - self.normalisation.mean) / self.normalisation.std
            with self.autocast():
                out = self.model(x[None, None])
            cls.append(out.x_norm_clstoken[0].float())
            features = out.patch_grid()[0].float().permute(3, 0, 1, 2)  # (D, g0, g1, g2)
            patch.append(sample_feature_grid(features, maps, x.shape, grid, p))
        return torch.stack(cls), torch.stack(patch)

    def _extra_description(self) -> dict[str, Any]:
        return {
            **super()._extra_description(),
            "reference_pipeline": {
                "background_crop": self.crop_background,
                "max_patches": self.max_patches,
                "source": "rmaguado/VoxelFM dinov2/inference (loaders, processing, distributed)",
            },
        }


# How a ViT sees our (X, Y, Z) volume: "xyz" as it is; "zyx" as (Z, Y, X), the order the
# reference reads a RAS-stored NIfTI in; "axial_display" as (Z, Y reversed, X reversed), the
# order the reference reads a standard axial DICOM series in (slices inferior -> superior,
# rows anterior -> posterior, columns patient right -> left).
INPUT_AXES = ("xyz", "zyx", "axial_display")


def to_input_axes(x: Tensor, input_axes: str) -> Tensor:
    """(..., X, Y, Z) -> the model's input axis order (see INPUT_AXES)."""
    if input_axes == "xyz":
        return x
    x = x.transpose(-1, -3)
    return x.flip(-2, -1) if input_axes == "axial_display" else x


def from_input_axes(patch: Tensor, input_axes: str) -> Tensor:
    """(..., g0, g1, g2, D) tokens in input axis order -> (..., gx, gy, gz, D)."""
    if input_axes == "xyz":
        return patch
    if input_axes == "axial_display":
        patch = patch.flip(-3, -2)
    return patch.transpose(-2, -4)


def build_voxelfm(config: Mapping[str, Any], device: torch.device, precision: str) -> ViTExtractor:
    from voxelfm.models.weights import load_backbone

    options = backbone_options(
        config, required=("path",), optional=("name", "spacing_mm", "input_axes")
    )
    path = _existing(options["path"], "exported backbone")
    sidecar = _read_sidecar(path)
    model = load_backbone(path)
    return ViTExtractor(
        model,
        kind="voxelfm",
        name=options.get("name", "voxelfm"),
        config=config,
        device=device,
        normalisation=_sidecar_normalisation(sidecar, path),
        input_axes=options.get("input_axes", "xyz"),
        precision=precision,
        spacing_mm=parse_spacing_mm(options.get("spacing_mm")),
        provenance={"weights_sha256": sidecar.get("weights_sha256")},
    )


def build_published(
    config: Mapping[str, Any], device: torch.device, precision: str
) -> ViTExtractor:
    from voxelfm.models.weights import load_published_checkpoint

    options = backbone_options(
        config,
        required=("path",),
        optional=(
            "name",
            "preset",
            "which",
            "overrides",
            "normalisation",
            "input_axes",
            "spacing_mm",
            "preprocessing",
            "precision",
            "max_patches",
            "crop_background",
        ),
    )
    variant = options.get("preprocessing", "canonical")
    if variant not in PUBLISHED_PREPROCESSING:
        raise VoxelFMError(
            f"published_voxelfm: preprocessing must be one of "
            f"{', '.join(PUBLISHED_PREPROCESSING)}, got {variant!r}"
        )
    reference = variant == "reference"
    only_reference = sorted({"max_patches", "crop_background"} & set(options))
    if only_reference and not reference:
        raise VoxelFMError(
            f"published_voxelfm: {', '.join(only_reference)} apply to preprocessing: reference"
        )
    # The reference runs its model in fp32; the canonical mode follows the run's precision.
    chosen = options.get("precision", "fp32" if reference else precision)
    if chosen not in PRECISIONS:
        raise VoxelFMError(
            f"published_voxelfm: precision must be one of {PRECISIONS}, got {chosen!r}"
        )
    path = _existing(options["path"], "published checkpoint")
    try:
        model = load_published_checkpoint(
            path,
            preset=options.get("preset", "base"),
            which=options.get("which", "teacher"),
            **dict(options.get("overrides") or {}),
        )
    except (ValueError, TypeError) as error:  # bad preset / which / overrides
        raise InputError(path, str(error)) from error
    common = {
        "kind": "published_voxelfm",
        "name": options.get("name", "published_voxelfm"),
        "config": config,
        "device": device,
        "input_axes": options.get("input_axes", "zyx"),
        "precision": chosen,
        "spacing_mm": parse_spacing_mm(options.get("spacing_mm")),
        "provenance": {"weights_sha256": file_sha256(path), "preprocessing": variant},
    }
    if not reference:
        return ViTExtractor(
            model, normalisation=_normalisation_option(options.get("normalisation"), path), **common
        )
    from voxelfm.extract.reference_pipeline import FILE_CLIP, REFERENCE_MAX_PATCHES

    # The reference clips in its loader ([-1000, 1900] for files) and standardises unclipped.
    normalisation = {"hu_clip": list(FILE_CLIP), **dict(options.get("normalisation") or {})}
    crop = options.get("crop_background", True)
    if not isinstance(crop, bool):
        raise VoxelFMError(
            f"published_voxelfm: crop_background must be true or false, got {crop!r}"
        )
    max_patches = options.get("max_patches", REFERENCE_MAX_PATCHES)
    if max_patches is not None and (not isinstance(max_patches, int) or max_patches < 1):
        raise VoxelFMError(
            f"published_voxelfm: max_patches must be a positive integer or null, got {max_patches!r}"
        )
    return ReferenceViTExtractor(
        model,
        normalisation=_normalisation_option(normalisation, path),
        max_patches=max_patches,
        crop_background=crop,
        **common,
    )


def build_random_init(
    config: Mapping[str, Any], device: torch.device, precision: str
) -> ViTExtractor:
    from voxelfm.models.vision_transformer import VisionTransformer3D, build_vit

    options = backbone_options(
        config,
        required=(),
        optional=(
            "name",
            "like",
            "preset",
            "overrides",
            "seed",
            "normalisation",
            "input_axes",
            "spacing_mm",
        ),
    )
    if ("like" in options) == ("preset" in options):
        raise VoxelFMError("random_init backbone config needs exactly one of 'like' or 'preset'")
    seed = int(options.get("seed", 0))
    if "like" in options:
        path = _existing(options["like"], "exported backbone")
        sidecar = _read_sidecar(path)
        if "normalisation" in options:
            raise VoxelFMError(
                "random_init with 'like' uses that backbone's normalisation; drop 'normalisation'"
            )
        normalisation = _sidecar_normalisation(sidecar, path)

        def construct() -> torch.nn.Module:
            try:
                return VisionTransformer3D(**sidecar["architecture"])
            except (KeyError, TypeError, ValueError) as error:
                raise InputError(path, f"sidecar architecture unusable: {error}") from error
    else:
        normalisation = _normalisation_option(options.get("normalisation"), "random_init spec")

        def construct() -> torch.nn.Module:
            try:
                return build_vit(options["preset"], **dict(options.get("overrides") or {}))
            except (ValueError, TypeError) as error:
                raise VoxelFMError(f"random_init backbone config: {error}") from error

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = construct()
    _warn_if_blocks_muted(model, options.get("name", "random_init"))
    return ViTExtractor(
        model,
        kind="random_init",
        name=options.get("name", "random_init"),
        config=config,
        device=device,
        normalisation=normalisation,
        input_axes=options.get("input_axes", "xyz"),
        precision=precision,
        spacing_mm=parse_spacing_mm(options.get("spacing_mm")),
        provenance={"seed": seed},
    )


# A LayerScale gain below this leaves a freshly initialised ViT's blocks all but inert.
MUTED_LAYERSCALE = 1e-3


def _warn_if_blocks_muted(model: torch.nn.Module, name: str) -> None:
    """Warn when a random ViT starts with the paper's LayerScale 1e-5: its blocks barely act,
    so its CLS vector is ~1e-4 in size (the final LayerNorm's epsilon dominates) and carries
    only a trace of the input, and its patch tokens are little more than the patch embedding.
    A baseline of that kind says little about what pretraining adds."""
    import warnings

    from voxelfm.models.layers.layer_scale import LayerScale

    gains = [
        float(m.gamma.detach().abs().max()) for m in model.modules() if isinstance(m, LayerScale)
    ]
    if gains and max(gains) < MUTED_LAYERSCALE:
        warnings.warn(
            f"random_init backbone {name!r} starts with LayerScale {max(gains):.0e}: its blocks "
            "barely act, so its CLS vector is ~1e-4 in size with only a trace of the input and "
            "its patch tokens are little more than the patch embedding; for a random baseline "
            "whose blocks act, add overrides: {layerscale_init: 0.1} (or use like: a trained "
            "backbone)",
            stacklevel=3,
        )


# --- helpers -------------------------------------------------------------------------------


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise InputError(path, f"{what} not found")
    return path


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The JSON sidecar of an exported backbone (file or folder, as ``save_backbone``)."""
    from voxelfm.models.weights import _backbone_paths

    _, sidecar_path = _backbone_paths(path)
    if not sidecar_path.is_file():
        raise InputError(sidecar_path, "backbone sidecar (JSON) not found")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(sidecar_path, f"not valid JSON: {error}") from error
    if not isinstance(sidecar, dict) or "architecture" not in sidecar:
        raise InputError(sidecar_path, "not a voxelfm backbone sidecar (no 'architecture')")
    return sidecar


def _sidecar_normalisation(sidecar: Mapping[str, Any], path: Path) -> HUNormalisation:
    try:
        return normalisation_from_config(sidecar.get("config"))
    except (VoxelFMError, ValueError, TypeError) as error:
        raise InputError(path, f"training config in the sidecar is unusable: {error}") from error


def _normalisation_option(values: Any, where: str | os.PathLike) -> HUNormalisation:
    try:
        return HUNormalisation.from_mapping(values)
    except (ValueError, TypeError) as error:
        raise VoxelFMError(f"{where}: normalisation: {error}") from error
