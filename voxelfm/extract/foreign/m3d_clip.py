"""M3D-CLIP (Bai et al. 2024, "M3D", arXiv 2404.00578) behind the ``FeatureExtractor`` API.

The model
---------
M3D-CLIP pairs a 3D ViT with a BERT text tower, trained contrastively on M3D-Cap. The image
encoder is the release's ``LaMed/src/model/multimodal_encoder/vit.py::ViT`` (BAAI-DCAI/M3D),
built from MONAI 1.3 blocks with ``pos_embed="perceptron"`` and ``classification=True``
(``LaMed/src/model/CLIP.py::M3DCLIPConfig``): input (1, D, H, W) = (1, 32, 256, 256), patch
(4, 16, 16) -> a (8, 16, 16) grid of 2048 tokens, a CLS token, width 768, MLP 3072, 12 layers,
12 heads, no qkv bias, final LayerNorm. ``M3DCLIP.encode_image`` applies
``mm_vision_proj`` (Linear 768 -> 768) to every final-norm token and L2-normalises; the
retrieval loss uses token 0, so the CLIP image embedding is 768-d.

It is rewritten here in plain PyTorch with the release's state-dict names (MONAI's own
blocks changed their keys since 1.3, e.g. ``norm_cross_attn`` in ``TransformerBlock``, so a
strict load of the 1.3-era checkpoint needs the 1.3 layout).

Weights
-------
The Hugging Face release ``GoodBaiBai88/M3D-CLIP`` holds the whole CLIP model
(``model.safetensors`` / ``pytorch_model.bin``: keys ``vision_encoder.*``,
``mm_vision_proj.*``, plus the text tower ``language_encoder.*``, ``mm_language_proj.*``,
``logit_scale``, ignored here) and ``pretrained_ViT.bin`` (the bare ViT, keys without
prefix, as ``LaMed`` loads it into ``vision_tower.vision_tower``). The latter has no
projection: use it with ``embedding: cls``.

Preprocessing (HU on our canonical grid -> the model's (1, 32, 256, 256) in [0, 1])
--------------------------------------------------------------------------------------
1. Our extraction padding is cut off (the box of ``valid`` voxels).
2. Axes: the model's (D, H, W) are axial slices stacked along D, each slice in the
   radiological display orientation: rows (H) anterior -> posterior, columns (W) patient
   right -> left. This is the (z, y, x) order of an LPS-stored NIfTI after M3D-Seg's
   ``np.swapaxes(image, -1, -3)`` (``Data/process/m3d_seg_data_prepare.py``) and the pixel
   order of the Radiopaedia slice images of M3D-Cap (``m3d_cap_data_prepare.py``). D runs
   inferior -> superior (NIfTI slice order) by default; ``slice_order: superior_first``
   reverses it (M3D-Cap stacks slices in the order of their file names, not documented).
   From our (X->R, Y->A, Z->S): D = Z, H = reversed Y, W = reversed X.
3. Intensity to [0, 1]. M3D-Cap images were display-windowed 8-bit slices, min-max
   normalised per volume; for HU data the authors' own path is M3D-Seg's
   (``Data/process/m3d_seg_data_preprocess.py::normalize`` then ``m3d_seg_data_prepare.py``):
   voxels above the volume mean are the foreground; clip to its 0.05 / 99.95 percentiles;
   z-score; min-max to [0, 1] (the z-score cancels in the min-max). That is the default
   (``intensity: foreground``). ``hu_window: [lo, hi]`` instead clips HU to a display window
   and min-max normalises, imitating M3D-Cap's windowed images.
4. ``CropForeground`` (MONAI default: the box of voxels > 0 of the normalised image), then
   ``Resize`` to (32, 256, 256), trilinear: M3D-Cap (``m3d_cap_data_prepare.py``) and
   M3D-Seg both call MONAI ``Resize(..., mode="bilinear")``, which MONAI resolves to
   trilinear (``align_corners=False``) on a 3D image (checked against MONAI here).

Outputs
-------
``cls``: with ``embedding: projected`` (default) the CLIP image embedding,
``normalize(mm_vision_proj(LN(x))[:, 0])`` (768-d, unit norm, what M3D's image-text retrieval
compares); ``embedding: cls`` gives the final-norm CLS token before the projection.
``patch``: the final-norm patch tokens (768-d). Their (8, 16, 16) grid has an anisotropic
stride (4 x 16 x 16 resized voxels) and the crop/resize differ per volume, so they are
resampled (trilinear, :func:`~voxelfm.extract.foreign.common.sample_feature_grid`) at the
centres of our cubic ``patch_size``-voxel patches (default 16); patches outside the
foreground crop take the nearest border token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.foreign.common import (
    AxisMap,
    ForeignExtractor,
    build_encoder_model,
    extractor_device,
    foreground_box,
    foreign_options,
    identity_maps,
    load_encoder_weights,
    resize_to,
    sample_feature_grid,
    spacing_option,
    valid_box,
)

MODEL_NAME = "M3D-CLIP"
DOWNLOAD_HINT = (
    "model.safetensors (or pytorch_model.bin / pretrained_ViT.bin) of the Hugging Face "
    "release GoodBaiBai88/M3D-CLIP"
)
# Keys of the release that are not the image encoder (text tower, temperature).
TEXT_TOWER_PREFIXES = ("language_encoder.", "mm_language_proj.", "logit_scale")
FOREGROUND_PERCENTILES = (0.05, 99.95)  # m3d_seg_data_preprocess.py::normalize
EMBEDDINGS = ("projected", "cls")
SLICE_ORDERS = ("inferior_first", "superior_first")


@dataclass(frozen=True)
class M3DViTConfig:
    """The vision encoder's hyper-parameters (defaults: the release, ``M3DCLIPConfig``)."""

    img_size: tuple[int, int, int] = (32, 256, 256)  # (D, H, W)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    in_channels: int = 1

    def __post_init__(self) -> None:
        img, patch = tuple(self.img_size), tuple(self.patch_size)
        if len(img) != 3 or len(patch) != 3 or any(i % p for i, p in zip(img, patch)):
            raise VoxelFMError(
                f"{MODEL_NAME}: img_size {img} must be three multiples of patch_size {patch}"
            )
        if self.hidden_size % self.num_heads:
            raise VoxelFMError(f"{MODEL_NAME}: hidden_size must be divisible by num_heads")
        object.__setattr__(self, "img_size", tuple(int(n) for n in img))
        object.__setattr__(self, "patch_size", tuple(int(n) for n in patch))

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(i // p for i, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None) -> M3DViTConfig:
        overrides = dict(overrides or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise VoxelFMError(
                f"{MODEL_NAME}: unknown overrides {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(known))}"
            )
        return cls(**overrides)


# --- architecture (state-dict names as the release: MONAI 1.3 ViT blocks) -------------------


class _ToPatches(nn.Module):
    """(B, C, D, H, W) -> (B, gD*gH*gW, pD*pH*pW*C), MONAI "perceptron" patch order."""

    def __init__(self, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        b, c, d, h, w = x.shape
        p1, p2, p3 = self.patch_size
        x = x.reshape(b, c, d // p1, p1, h // p2, p2, w // p3, p3)
        # "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)" in MONAI's letters.
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, (d // p1) * (h // p2) * (w // p3), p1 * p2 * p3 * c)


class _PatchEmbedding(nn.Module):
    def __init__(self, config: M3DViTConfig) -> None:
        super().__init__()
        patch_dim = config.in_channels * math.prod(config.patch_size)
        self.patch_embeddings = nn.Sequential(
            _ToPatches(config.patch_size), nn.Linear(patch_dim, config.hidden_size)
        )
        n_patches = math.prod(config.grid)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches, config.hidden_size))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_embeddings(x) + self.position_embeddings


class _MLP(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.gelu(self.linear1(x)))  # MONAI MLPBlock: exact (erf) GELU


class _SelfAttention(nn.Module):
    """MONAI 1.3 ``SABlock``: fused qkv (no bias) split as (3, heads, head_dim), out_proj."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )  # (B, heads, N, head_dim), softmax(q k^T / sqrt(head_dim)) v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, config: M3DViTConfig) -> None:
        super().__init__()
        self.mlp = _MLP(config.hidden_size, config.mlp_dim)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = _SelfAttention(config.hidden_size, config.num_heads)
        self.norm2 = nn.LayerNorm(config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class M3DViT(nn.Module):
    """M3D's 3D ViT: (B, 1, D, H, W) in [0, 1] -> (B, 1 + N, hidden) final-norm tokens."""

    def __init__(self, config: M3DViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = _PatchEmbedding(config)
        self.blocks = nn.ModuleList([_Block(config) for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embedding(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class M3DCLIPImageEncoder(nn.Module):
    """The image half of ``M3DCLIP``: ``vision_encoder`` and ``mm_vision_proj``."""

    def __init__(self, config: M3DViTConfig) -> None:
        super().__init__()
        self.vision_encoder = M3DViT(config)
        self.mm_vision_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 1, D, H, W) -> (projected unit CLS (B, C), final-norm tokens (B, 1 + N, C))."""
        tokens = self.vision_encoder(x)
        return F.normalize(self.mm_vision_proj(tokens[:, 0]), dim=-1), tokens


# --- preprocessing ------------------------------------------------------------------------


def percentile(values: Tensor, q: float) -> Tensor:
    """numpy's default ("linear") percentile of a 1-D tensor, any size (torch.quantile caps)."""
    ordered = values.flatten().sort().values
    position = (ordered.numel() - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def normalise_intensity(hu: Tensor, hu_window: Sequence[float] | None) -> Tensor:
    """HU (any shape) -> [0, 1]: M3D-Seg's foreground clip, or a display window; then min-max."""
    hu = hu.float()
    if hu_window is None:
        foreground = hu[hu > hu.mean()]
        if foreground.numel() == 0:  # a constant volume
            foreground = hu.flatten()
        low, high = (percentile(foreground, q) for q in FOREGROUND_PERCENTILES)
    else:
        low, high = (torch.tensor(float(v), device=hu.device) for v in hu_window)
    x = torch.minimum(torch.maximum(hu, low), high)
    x = x - x.min()
    return x / x.max().clamp(min=1e-8)


# --- extractor -------------------------------------------------------------------------------


class M3DCLIPExtractor(ForeignExtractor):
    """M3D-CLIP's image encoder with its preprocessing (see the module docstring)."""

    kind = "m3d_clip"

    def __init__(
        self,
        model: M3DCLIPImageEncoder,
        *,
        embedding: str = "projected",
        hu_window: Sequence[float] | None = None,
        slice_order: str = "inferior_first",
        patch_size: int = 16,
        **base: Any,
    ) -> None:
        if embedding not in EMBEDDINGS:
            raise VoxelFMError(f"{MODEL_NAME}: embedding must be one of {EMBEDDINGS}")
        if slice_order not in SLICE_ORDERS:
            raise VoxelFMError(f"{MODEL_NAME}: slice_order must be one of {SLICE_ORDERS}")
        if hu_window is not None:
            hu_window = tuple(float(v) for v in hu_window)
            if len(hu_window) != 2 or not hu_window[0] < hu_window[1]:
                raise VoxelFMError(f"{MODEL_NAME}: hu_window must be [low, high], low < high")
        if int(patch_size) < 1:
            raise VoxelFMError(f"{MODEL_NAME}: patch_size must be >= 1, got {patch_size}")
        architecture = model.vision_encoder.config
        super().__init__(
            embed_dim=architecture.hidden_size,
            patch_size=int(patch_size),
            model_name=MODEL_NAME,
            preprocessing={
                "axes": "(D, H, W) = (Z, reversed Y, reversed X)"
                + (" with D reversed" if slice_order == "superior_first" else ""),
                "intensity": (
                    f"foreground percentile clip {list(FOREGROUND_PERCENTILES)}, min-max"
                    if hu_window is None
                    else f"HU window {list(hu_window)}, min-max"
                ),
                "crop": "foreground (normalised > 0)",
                "resize": list(architecture.img_size),
            },
            extra={"architecture": asdict(architecture), "embedding": embedding},
            **base,
        )
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.architecture = architecture
        self.embedding = embedding
        self.hu_window = hu_window
        self.slice_order = slice_order

    def prepare(
        self, hu: Tensor, valid: Tensor | None = None
    ) -> tuple[Tensor, list[list[AxisMap]]]:
        """(B, 1, X, Y, Z) HU -> (B, 1, D, H, W) model input in [0, 1], and per sample the
        maps of our voxel coordinates onto the model input's axes."""
        size = self.architecture.img_size
        inputs, all_maps = [], []
        for b in range(hu.shape[0]):
            box = valid_box(None if valid is None else valid[b], hu.shape[-3:])
            volume = hu[b, 0][box].to(self.device, torch.float32)  # (x, y, z) real voxels
            maps = identity_maps((2, 1, 0))  # model (D, H, W) <- our (Z, Y, X)
            maps = [m.moved(-box[m.source].start) for m in maps]
            x = volume.permute(2, 1, 0).flip(1, 2)  # (D, H, W) = (Z, A->P, R->L)
            maps[1] = maps[1].flipped(x.shape[1])
            maps[2] = maps[2].flipped(x.shape[2])
            if self.slice_order == "superior_first":
                x = x.flip(0)
                maps[0] = maps[0].flipped(x.shape[0])
            x = normalise_intensity(x, self.hu_window)
            crop = foreground_box(x)
            x = x[tuple(crop)]
            maps = [m.moved(-crop[axis].start) for axis, m in enumerate(maps)]
            inputs.append(resize_to(x[None, None], size, maps)[0])
            all_maps.append(maps)
        return torch.stack(inputs), all_maps

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x, all_maps = self.prepare(hu, valid)
        with self.autocast():
            projected, tokens = self.model(x)
        projected, tokens = projected.float(), tokens.float()
        cls = projected if self.embedding == "projected" else tokens[:, 0]
        feature_maps = (
            tokens[:, 1:].reshape(x.shape[0], *self.architecture.grid, -1).permute(0, 4, 1, 2, 3)
        )
        grid = [n // self.patch_size for n in hu.shape[-3:]]
        patch = torch.stack(
            [
                sample_feature_grid(
                    feature_maps[b], maps, self.architecture.img_size, grid, self.patch_size
                )
                for b, maps in enumerate(all_maps)
            ]
        )
        return cls, patch


def build_m3d_clip(
    config: Mapping[str, Any], device: torch.device, precision: str
) -> M3DCLIPExtractor:
    """Config: ``path`` (the release's weights) or ``random_weights: true``; optional ``name``,
    ``device``, ``spacing_mm`` (default none: the store's), ``embedding`` ("projected" |
    "cls"), ``hu_window`` ([lo, hi]; default: M3D-Seg's foreground normalisation),
    ``slice_order``, ``patch_size`` (16), ``overrides`` (architecture, for tests), ``seed``
    (random weights)."""
    options = foreign_options(
        config,
        MODEL_NAME,
        optional=("embedding", "hu_window", "slice_order", "patch_size", "overrides", "seed"),
    )
    architecture = M3DViTConfig.from_overrides(options.get("overrides"))
    embedding = options.get("embedding", "projected")
    model, sha256 = build_encoder_model(
        options,
        "m3d_clip",
        partial(M3DCLIPImageEncoder, architecture),
        load=partial(_load_weights, embedding=embedding),
    )
    return M3DCLIPExtractor(
        model,
        embedding=embedding,
        hu_window=options.get("hu_window"),
        slice_order=options.get("slice_order", "inferior_first"),
        patch_size=int(options.get("patch_size", 16)),
        name=options.get("name", "m3d_clip"),
        config=config,
        device=extractor_device(options, device),
        precision=precision,
        spacing_mm=spacing_option(options, None),
        weights_sha256=sha256,
    )


def _load_weights(model: M3DCLIPImageEncoder, path: Any, embedding: str) -> str:
    """The CLIP release (vision_encoder + mm_vision_proj), or a bare ViT for ``cls``."""
    if embedding == "cls":
        # Only the ViT is needed: accept the whole CLIP file or pretrained_ViT.bin.
        return load_encoder_weights(
            model.vision_encoder,
            path,
            model=MODEL_NAME,
            download_hint=DOWNLOAD_HINT,
            prefixes=("module.", "vision_encoder."),
            ignore_prefixes=_with_module((*TEXT_TOWER_PREFIXES, "mm_vision_proj.")),
        )
    try:
        return load_encoder_weights(
            model,
            path,
            model=MODEL_NAME,
            download_hint=DOWNLOAD_HINT,
            prefixes=("module.",),
            ignore_prefixes=_with_module(TEXT_TOWER_PREFIXES),
        )
    except InputError as error:
        if "missing keys" in error.reason:
            raise InputError(
                error.path,
                f"{error.reason} (a bare ViT file such as pretrained_ViT.bin has no "
                "mm_vision_proj: use it with embedding: cls)",
            ) from error
        raise


def _with_module(prefixes: Sequence[str]) -> tuple[str, ...]:
    """The prefixes as given and under a DataParallel/DeepSpeed ``module.`` wrapper."""
    return (*prefixes, *(f"module.{prefix}" for prefix in prefixes))
