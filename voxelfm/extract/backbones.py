"""Backbones as plug-ins: one feature-extractor interface behind every probe.

A backbone is named in the config by a *spec*, a JSON-like mapping with a ``kind`` and the
options of that kind, and built with :func:`build_extractor`::

    {"kind": "voxelfm", "path": "results/demo/pretrain/teacher_backbone"}
    {"kind": "published_voxelfm", "path": "/x/teacher_checkpoint.pth", "preset": "base"}
    {"kind": "random_init", "like": "results/demo/pretrain/teacher_backbone", "seed": 0}
    {"kind": "random_init", "preset": "tiny", "overrides": {"depth": 2}, "seed": 0}
    {"kind": "handcrafted", "bins": 32, "patch_size": 8}

Every spec also accepts ``name`` (defaults to the kind). Kinds live in the open registry
``BACKBONE_KINDS`` (kind -> factory ``(spec, device, precision) -> FeatureExtractor``);
:func:`register_backbone` adds one (e.g. adapters for other CT foundation models) without
touching the extraction or probe code.

Every extractor takes **HU** (float32, ``(B, 1, X, Y, Z)`` on the canonical RAS grid, axes as
in ``voxelfm.conventions``) and does its own intensity normalisation, so the probes never
need to know what a backbone expects.

Kinds
-----
``voxelfm``: our exported teacher backbone (``voxelfm export``: safetensors + JSON sidecar).
    Normalisation is read from the training config stored in the sidecar (its ``crops``
    section, parsed by ``MultiCropConfig.from_recipe``), i.e. exactly what training used.
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
``handcrafted``: an HU histogram (``bins`` over the clip range ``hu_range``) and intensity
    statistics; see :class:`HandcraftedExtractor`. The same vector is computed per
    ``patch_size``-voxel block as patch tokens, so dense probes can use it too.

Optional common keys: ``spacing_mm`` (the voxel size the backbone expects; a volume read
from a file is resampled to it; None = the store's default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from voxelfm.conventions import HU_MAX, HU_MIN
from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.normalisation import HUNormalisation, normalisation_from_config
from voxelfm.utils.jsonable import to_jsonable

Factory = Callable[[Mapping[str, Any], torch.device, str], "FeatureExtractor"]

PRECISIONS = ("fp32", "bf16")


class FeatureExtractor(ABC):
    """A frozen backbone: HU volumes in, a global vector and (optionally) patch tokens out.

    Attributes:
        kind: registry name of the implementation.
        name: the backbone's name in reports and embedding stores.
        embed_dim: D, the width of the global vector and of every patch token.
        patch_size: edge in voxels of the cubic patch behind one token, or None when the
            extractor has no patch tokens (then only whole-volume extraction applies).
        spacing_mm: the voxel size the extractor expects, or None for any.
        device: where ``forward`` runs.
        spec: the spec it was built from (JSON-serialisable), recorded in embedding stores.
    """

    kind: ClassVar[str] = ""
    name: str
    embed_dim: int
    patch_size: int | None
    spacing_mm: tuple[float, float, float] | None = None
    device: torch.device
    spec: dict[str, Any]

    @abstractmethod
    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Embed a batch.

        Args:
            hu: (B, 1, X, Y, Z) float32 HU; X, Y, Z multiples of ``patch_size`` (if set).
            valid: optional (B, 1, X, Y, Z) bool, False on padding voxels. Extractors may
                ignore it (the ViTs do: padding is air, which they see as air); the
                handcrafted baseline computes its statistics over valid voxels only.

        Returns:
            cls: (B, D) float32 global vectors.
            patch: (B, gx, gy, gz, D) float32 patch tokens, gx = X / patch_size..., or None.
        """

    def __call__(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        with torch.inference_mode():
            return self.forward(hu, valid)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description for provenance (stored with the embeddings)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "embed_dim": int(self.embed_dim),
            "patch_size": None if self.patch_size is None else int(self.patch_size),
            "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
            "spec": to_jsonable(self.spec),
            **self._extra_description(),
        }

    def _extra_description(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, embed_dim={self.embed_dim}, "
            f"patch_size={self.patch_size}, device={self.device})"
        )


# --- registry --------------------------------------------------------------------------

BACKBONE_KINDS: dict[str, Factory] = {}


def register_backbone(kind: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
    """Decorator adding ``factory(spec, device, precision) -> FeatureExtractor`` as ``kind``."""

    def decorate(factory: Factory) -> Factory:
        if kind in BACKBONE_KINDS and not replace:
            raise ValueError(f"backbone kind {kind!r} is already registered")
        BACKBONE_KINDS[kind] = factory
        return factory

    return decorate


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is a user error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise VoxelFMError(f"unknown device {device!r}; use auto, cpu or cuda") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VoxelFMError(f"device {device!r} requested but no CUDA GPU is available")
    return resolved


def build_extractor(
    spec: Mapping[str, Any],
    device: str | torch.device = "auto",
    *,
    precision: str = "fp32",
) -> FeatureExtractor:
    """Build the extractor a config spec names (see the module docstring for the kinds).

    Args:
        spec: mapping with ``kind`` and that kind's options.
        device: "auto" (cuda if available), "cpu", "cuda" or a torch.device.
        precision: "fp32", or "bf16" for autocast on CUDA (CPU always runs fp32).

    Raises:
        VoxelFMError (one line): unknown kind or option; InputError naming the path for a
        missing or unusable checkpoint.
    """
    if not isinstance(spec, Mapping):
        raise VoxelFMError(f"backbone spec must be a mapping with a 'kind', got {spec!r}")
    kind = spec.get("kind")
    if kind not in BACKBONE_KINDS:
        import voxelfm.extract.foreign  # noqa: F401  (registers the other CT foundation models)
    if kind not in BACKBONE_KINDS:
        raise VoxelFMError(
            f"unknown backbone kind {kind!r}; registered kinds: {', '.join(sorted(BACKBONE_KINDS))}"
        )
    if precision not in PRECISIONS:
        raise VoxelFMError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return BACKBONE_KINDS[kind](dict(spec), resolve_device(device), precision)


# --- ViT backbones -----------------------------------------------------------------------


class ViTExtractor(FeatureExtractor):
    """A VisionTransformer3D: final-norm CLS token and patch tokens."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        kind: str,
        name: str,
        spec: Mapping[str, Any],
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
        self.spec = dict(spec)
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

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

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


@register_backbone("voxelfm")
def _build_voxelfm(spec: Mapping[str, Any], device: torch.device, precision: str) -> ViTExtractor:
    from voxelfm.models.weights import load_backbone

    options = _options(spec, required=("path",), optional=("name", "spacing_mm", "input_axes"))
    path = _existing(options["path"], "exported backbone")
    sidecar = _read_sidecar(path)
    model = load_backbone(path)
    return ViTExtractor(
        model,
        kind="voxelfm",
        name=options.get("name", "voxelfm"),
        spec=spec,
        device=device,
        normalisation=_config_normalisation(sidecar, path),
        input_axes=options.get("input_axes", "xyz"),
        precision=precision,
        spacing_mm=_spacing(options.get("spacing_mm")),
        provenance={"weights_sha256": sidecar.get("weights_sha256")},
    )


@register_backbone("published_voxelfm")
def _build_published(spec: Mapping[str, Any], device: torch.device, precision: str) -> ViTExtractor:
    from voxelfm.models.weights import load_published_checkpoint

    options = _options(
        spec,
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
        "spec": spec,
        "device": device,
        "input_axes": options.get("input_axes", "zyx"),
        "precision": chosen,
        "spacing_mm": _spacing(options.get("spacing_mm")),
        "provenance": {"weights_sha256": _file_sha256(path), "preprocessing": variant},
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


@register_backbone("random_init")
def _build_random_init(
    spec: Mapping[str, Any], device: torch.device, precision: str
) -> ViTExtractor:
    from voxelfm.models.vision_transformer import VisionTransformer3D, build_vit

    options = _options(
        spec,
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
        raise VoxelFMError("random_init backbone spec needs exactly one of 'like' or 'preset'")
    seed = int(options.get("seed", 0))
    if "like" in options:
        path = _existing(options["like"], "exported backbone")
        sidecar = _read_sidecar(path)
        if "normalisation" in options:
            raise VoxelFMError(
                "random_init with 'like' uses that backbone's normalisation; drop 'normalisation'"
            )
        normalisation = _config_normalisation(sidecar, path)

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
                raise VoxelFMError(f"random_init backbone spec: {error}") from error

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = construct()
    _warn_if_blocks_muted(model, options.get("name", "random_init"))
    return ViTExtractor(
        model,
        kind="random_init",
        name=options.get("name", "random_init"),
        spec=spec,
        device=device,
        normalisation=normalisation,
        input_axes=options.get("input_axes", "xyz"),
        precision=precision,
        spacing_mm=_spacing(options.get("spacing_mm")),
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


# --- handcrafted baseline -----------------------------------------------------------------

# Tissue classes as a partition of the HU axis: [low, high) in HU (air includes everything
# below -900, bone everything from 300 up, so the fractions sum to 1).
TISSUE_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("air", -float("inf"), -900.0),
    ("lung", -900.0, -200.0),
    ("fat", -200.0, -30.0),
    ("soft", -30.0, 300.0),
    ("bone", 300.0, float("inf")),
)
PERCENTILES: tuple[float, ...] = (5.0, 25.0, 50.0, 75.0, 95.0)
KHU = 1000.0  # HU statistics are reported in units of 1000 HU so every feature is O(1)


class HandcraftedExtractor(FeatureExtractor):
    """HU histogram and intensity statistics, globally (CLS) and per block (patch tokens).

    The vector of a set of voxels (HU clipped to ``hu_range``), in this order:

    * ``hist_0 .. hist_{bins-1}``: fraction of voxels in each of ``bins`` equal-width bins
      spanning ``hu_range`` (the top value falls in the last bin);
    * ``mean_khu``, ``std_khu``: mean and population standard deviation, in 1000 HU;
    * ``p05_khu .. p95_khu``: percentiles 5, 25, 50, 75, 95 (linear interpolation, as
      numpy's default), in 1000 HU;
    * ``frac_air``, ``frac_lung``, ``frac_fat``, ``frac_soft``, ``frac_bone``: fractions of
      voxels in the HU classes of ``TISSUE_CLASSES`` (a partition: they sum to 1).

    Only ``valid`` voxels count (padding does not), and a set with no valid voxel gets the
    zero vector. Patch token (i, j, k) is the vector of block
    ``[i*p, (i+1)*p) x [j*p, (j+1)*p) x [k*p, (k+1)*p)``, p = ``patch_size``.
    """

    kind = "handcrafted"

    def __init__(
        self,
        *,
        bins: int = 32,
        patch_size: int = 8,
        hu_range: tuple[float, float] = (HU_MIN, HU_MAX),
        name: str = "handcrafted",
        spec: Mapping[str, Any] | None = None,
        device: torch.device | str = "cpu",
        spacing_mm: tuple[float, float, float] | None = None,
    ) -> None:
        if int(bins) < 1 or int(patch_size) < 1:
            raise VoxelFMError(
                f"handcrafted: bins and patch_size must be >= 1, got {bins}, {patch_size}"
            )
        low, high = (float(v) for v in hu_range)
        if not low < high:
            raise VoxelFMError(
                f"handcrafted: hu_range must be (low, high) with low < high, got {hu_range}"
            )
        self.bins = int(bins)
        self.patch_size = int(patch_size)
        self.hu_range = (low, high)
        self.name = name
        self.spec = dict(spec or {"kind": "handcrafted"})
        self.device = torch.device(device)
        self.spacing_mm = spacing_mm
        self.feature_names = (
            [f"hist_{i}" for i in range(self.bins)]
            + ["mean_khu", "std_khu"]
            + [f"p{int(q):02d}_khu" for q in PERCENTILES]
            + [f"frac_{tissue}" for tissue, _, _ in TISSUE_CLASSES]
        )
        self.embed_dim = len(self.feature_names)

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        hu = hu.to(self.device, torch.float32).clamp(*self.hu_range)
        batch, _, *shape = hu.shape
        valid = (
            torch.ones_like(hu, dtype=torch.bool)
            if valid is None
            else valid.to(self.device, torch.bool)
        )
        cls = self.describe_voxels(hu.reshape(batch, -1), valid.reshape(batch, -1))
        p = self.patch_size
        if any(size % p for size in shape):
            raise ValueError(f"volume shape {tuple(shape)} is not a multiple of the patch size {p}")
        grid = tuple(size // p for size in shape)

        def blocks(x: Tensor) -> Tensor:  # (B, 1, X, Y, Z) -> (B * gx * gy * gz, p^3)
            x = x.reshape(batch, grid[0], p, grid[1], p, grid[2], p)
            return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, p**3)

        patch = self.describe_voxels(blocks(hu), blocks(valid))
        return cls, patch.reshape(batch, *grid, self.embed_dim)

    def describe_voxels(self, values: Tensor, valid: Tensor) -> Tensor:
        """(M, n) HU and (M, n) bool -> (M, embed_dim) feature vectors (see class doc)."""
        weights = valid.to(torch.float64)
        count = weights.sum(-1, keepdim=True)  # (M, 1)
        safe = count.clamp(min=1.0)
        low, high = self.hu_range
        index = ((values - low) * (self.bins / (high - low))).floor().long().clamp(0, self.bins - 1)
        hist = torch.zeros(values.shape[0], self.bins, dtype=torch.float64, device=values.device)
        hist.scatter_add_(1, index, weights)
        v64 = values.to(torch.float64)
        mean = (v64 * weights).sum(-1, keepdim=True) / safe
        var = (((v64 - mean) ** 2) * weights).sum(-1, keepdim=True) / safe
        percentiles = _masked_percentiles(v64, valid, count, PERCENTILES)
        # The classes partition the HU axis, so one bucketize + scatter counts them all.
        boundaries = torch.tensor(
            [lo for _, lo, _ in TISSUE_CLASSES[1:]], dtype=values.dtype, device=values.device
        )
        tissue = torch.bucketize(values, boundaries, right=True)  # class i: [lo_i, hi_i)
        fractions = torch.zeros(
            values.shape[0], len(TISSUE_CLASSES), dtype=torch.float64, device=values.device
        ).scatter_add_(1, tissue, weights)
        features = torch.cat(
            [hist / safe, mean / KHU, var.sqrt() / KHU, percentiles / KHU, fractions / safe],
            dim=-1,
        )
        return torch.where(count > 0, features, torch.zeros_like(features)).to(torch.float32)

    def _extra_description(self) -> dict[str, Any]:
        return {
            "bins": self.bins,
            "hu_range": list(self.hu_range),
            "feature_names": list(self.feature_names),
            "tissue_classes_hu": {name: [lo, hi] for name, lo, hi in TISSUE_CLASSES},
        }


def _masked_percentiles(
    values: Tensor, valid: Tensor, count: Tensor, percentiles: tuple[float, ...]
) -> Tensor:
    """Per-row percentiles of the valid entries, numpy's 'linear' method; (M, len(q))."""
    ordered = torch.where(valid, values, torch.full_like(values, float("inf"))).sort(-1).values
    last = (count - 1).clamp(min=0)  # (M, 1) index of the largest valid value
    position = last * torch.tensor(percentiles, dtype=values.dtype, device=values.device) / 100
    below = position.floor()
    above = position.ceil()
    lo = ordered.gather(1, below.long())
    hi = ordered.gather(1, above.long())
    # Where the two neighbours coincide the weight is 0; avoid inf - inf for empty rows.
    result = lo + torch.where(above > below, (hi - lo) * (position - below), torch.zeros_like(lo))
    return torch.where(count > 0, result, torch.zeros_like(result))


@register_backbone("handcrafted")
def _build_handcrafted(
    spec: Mapping[str, Any], device: torch.device, precision: str
) -> HandcraftedExtractor:
    options = _options(
        spec, required=(), optional=("name", "bins", "patch_size", "hu_range", "spacing_mm")
    )
    return HandcraftedExtractor(
        bins=int(options.get("bins", 32)),
        patch_size=int(options.get("patch_size", 8)),
        hu_range=tuple(options.get("hu_range", (HU_MIN, HU_MAX))),
        name=options.get("name", "handcrafted"),
        spec=spec,
        device=device,
        spacing_mm=_spacing(options.get("spacing_mm")),
    )


# --- helpers -------------------------------------------------------------------------------


def _options(
    spec: Mapping[str, Any], *, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, Any]:
    """The spec's options (without ``kind``), checked against what the kind accepts."""
    kind = spec.get("kind")
    options = {key: value for key, value in spec.items() if key != "kind"}
    missing = [key for key in required if key not in options]
    if missing:
        raise VoxelFMError(f"{kind} backbone spec is missing {', '.join(missing)}")
    unknown = sorted(set(options) - set(required) - set(optional))
    if unknown:
        raise VoxelFMError(
            f"{kind} backbone spec has unknown keys {', '.join(unknown)}; "
            f"accepted: {', '.join((*required, *optional))}"
        )
    return options


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


def _config_normalisation(sidecar: Mapping[str, Any], path: Path) -> HUNormalisation:
    try:
        return normalisation_from_config(sidecar.get("config"))
    except (VoxelFMError, ValueError, TypeError) as error:
        raise InputError(path, f"training config in the sidecar is unusable: {error}") from error


def _normalisation_option(values: Any, where: str | os.PathLike) -> HUNormalisation:
    try:
        return HUNormalisation.from_mapping(values)
    except (ValueError, TypeError) as error:
        raise VoxelFMError(f"{where}: normalisation: {error}") from error


def _spacing(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3 or min(values) <= 0:
        raise VoxelFMError(f"spacing_mm must be a positive number or three of them, got {value!r}")
    return tuple(values)  # type: ignore[return-value]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
