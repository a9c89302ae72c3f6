"""CT-CLIP (Hamamci et al. 2024, "Developing generalist foundation models from a multimodal
dataset for 3D computed tomography", arXiv 2403.17834) behind the ``FeatureExtractor`` API.

The model
---------
CT-CLIP's image encoder is CTViT, the encoder half of a lucidrains-style video VQ-VAE
(``transformer_maskgit/ctvit.py`` and ``attention.py`` of ibrahimethemhamamci/CT-CLIP),
built in the release's scripts as ``CTViT(dim=512, codebook_size=8192, image_size=480,
patch_size=20, temporal_patch_size=10, spatial_depth=4, temporal_depth=4, dim_head=32,
heads=8)``. On a (1, D, H, W) = (1, 240, 480, 480) input:

1. ``to_patch_emb``: 10 x 20 x 20 patches (flattened as (c, pt, p1, p2)) -> LayerNorm(4000)
   -> Linear(4000, 512) -> LayerNorm(512): a (t, h, w) = (24, 24, 24) token grid.
2. ``enc_spatial_transformer`` (4 layers) over the h*w tokens of each t, with a continuous
   relative position bias (``spatial_rel_pos_bias``: MLP on signed-log (dh, dw)), then
   ``enc_temporal_transformer`` (4 layers) over t for each (h, w). Each layer: a PEG
   (depthwise 3^3 conv on the whole (t, h, w) grid, causal along t), attention, GEGLU
   feed-forward; a bias-free LayerNorm at the end. Details reproduced from the release:
   the attention normalises only the queries' input (keys/values see the un-normalised
   tokens), l2-normalises q and k, scales them by learned ``q_scale``/``k_scale`` and the
   logits by 8; the temporal PEG reshapes its ((b h w), t) tokens to (b, t, h, w) as a plain
   reshape (as the release does).
3. ``vq``: cosine-similarity vector quantisation (vector-quantize-pytorch 1.1.2,
   ``use_cosine_sim=True``): every token is replaced by the codebook row (of 8192) with
   the highest cosine similarity. ``CTViT(..., return_encoded_tokens=True)`` returns these
   quantised tokens, and CT-CLIP uses them.

``CTCLIP.forward`` (and its zero-shot/latent scripts) then averages the tokens over t,
flattens (h, w, 512) = 294912 values, applies ``to_visual_latent`` (Linear 294912 -> 512,
no bias) and L2-normalises: the 512-d image latent.

Weights
-------
``CT-CLIP_v2.pt`` from the CT-RATE dataset on Hugging Face (``ibrahimethemhamamci/CT-RATE``,
folder ``models/CT-CLIP-Related``): the whole ``CTCLIP`` state dict. Used here:
``visual_transformer.{to_patch_emb, spatial_rel_pos_bias, enc_spatial_transformer,
enc_temporal_transformer}.*``, ``visual_transformer.vq._codebook.embed`` and
``to_visual_latent.weight``. Ignored: the text tower (``text_transformer.*``,
``to_text_latent*``, ``temperature``), ``to_visual_latent_extra``, and the parts of CTViT
the encoder never runs (first-frame patch embedding, pixel decoders, decoder transformers,
the VQ's EMA statistics). The attention layers' zero-size ``null_kv`` and unused
``context_norm`` are kept as (unused) parameters so that every release key is accounted for.

Preprocessing (HU on our canonical grid -> the model's (1, 240, 480, 480))
-----------------------------------------------------------------------
From ``scripts/data_inference_nii.py::nii_img_to_tensor`` (the release's NIfTI loader):

1. Our extraction padding is cut off (the box of ``valid`` voxels).
2. HU clipped to [-1000, 1000], divided by 1000.
3. Axes: the loader keeps the NIfTI's stored voxel order, (i, j, k) -> (D, H, W) = (k, i, j).
   CT-RATE volumes are taken to be stored LPS (i: right -> left, j: anterior -> posterior,
   k: inferior -> superior), as a third-party CT-CLIP feature-extraction script
   (kmin940/CT-CLIP_CVPR26CTFM, ``extract_feat_LP.py``) reorients every input to before
   this loader; the release itself does not say. From our (X->R, Y->A, Z->S):
   D = Z, H = reversed X, W = reversed Y.
4. Spacing (z, y, x) = (1.5, 0.75, 0.75) mm: the extractor's ``spacing_mm`` is
   (0.75, 0.75, 1.5) on our (X, Y, Z), so our extraction already resamples there; another
   ``spacing_mm`` is resampled in ``forward`` (trilinear, ``align_corners=False``, new size
   ``int(n * ours / target)`` as ``resize_array``).
5. Centre crop or pad (value -1, i.e. -1000 HU) to (D, H, W) = (240, 480, 480).

Outputs
-------
``cls``: the 512-d L2-normalised image latent (``to_visual_latent``), what CT-CLIP's
zero-shot classification and retrieval compare. (The mean of the patch tokens, stored by
our extraction as ``pooled``, is the common alternative for linear probes.)
``patch``: the quantised token grid (``patch_tokens: encoder`` gives the tokens before the
VQ), 512-d. A token spans 10 x 20 x 20 model voxels = 15 mm in every direction; on our grid
(0.75, 0.75, 1.5 mm voxels, cubic ``patch_size`` = 20 voxels: 15 x 15 x 30 mm patches) the
token grid is resampled (trilinear, :func:`~voxelfm.extract.foreign.common.sample_feature_grid`)
at our patch centres; parts of a volume beyond CT-CLIP's 360 mm field (cropped away) take
the nearest border token, so large volumes are best extracted in sliding windows of at most
(480, 480, 240) voxels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelfm.errors import VoxelFMError
from voxelfm.extract.foreign.common import (
    AxisMap,
    ForeignExtractor,
    build_encoder_model,
    center_pad_or_crop,
    extractor_device,
    foreign_options,
    identity_maps,
    load_encoder_weights,
    resize_to,
    sample_feature_grid,
    spacing_option,
    valid_box,
)

MODEL_NAME = "CT-CLIP"
DOWNLOAD_HINT = (
    "CT-CLIP_v2.pt from the Hugging Face dataset ibrahimethemhamamci/CT-RATE "
    "(models/CT-CLIP-Related)"
)
HU_CLIP = (-1000.0, 1000.0)
HU_SCALE = 1000.0
PAD_VALUE = -1.0  # -1000 HU after scaling
MODEL_SPACING_XYZ = (0.75, 0.75, 1.5)  # on our (X, Y, Z); the release's (z, y, x) = (1.5, .75, .75)
PATCH_TOKEN_KINDS = ("quantized", "encoder")
# Release keys that the image encoder's forward never uses (see the module docstring).
IGNORED_PREFIXES = (
    "text_transformer.",
    "to_text_latent",
    "temperature",
    "to_visual_latent_extra.",
    "visual_transformer.to_patch_emb_first_frame.",
    "visual_transformer.to_pixels",
    "visual_transformer.dec_",
    "visual_transformer.discr.",
    "visual_transformer.vgg.",
    "visual_transformer.vq._codebook.initted",
    "visual_transformer.vq._codebook.cluster_size",
    "visual_transformer.vq._codebook.embed_avg",
)


@dataclass(frozen=True)
class CTViTConfig:
    """CTViT encoder + latent projection sizes (defaults: the release)."""

    dim: int = 512
    image_size: int = 480  # H = W
    frames: int = 240  # D
    patch_size: int = 20
    temporal_patch_size: int = 10
    spatial_depth: int = 4
    temporal_depth: int = 4
    dim_head: int = 32
    heads: int = 8
    codebook_size: int = 8192
    latent_dim: int = 512

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or self.frames % self.temporal_patch_size:
            raise VoxelFMError(
                f"{MODEL_NAME}: image_size/frames must be multiples of patch_size/"
                "temporal_patch_size"
            )
        if self.latent_dim != self.dim:
            # Our interface has one width for the global vector and the patch tokens.
            raise VoxelFMError(f"{MODEL_NAME}: latent_dim must equal dim ({self.dim})")

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(D, H, W) of the model input."""
        return (self.frames, self.image_size, self.image_size)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) token grid."""
        side = self.image_size // self.patch_size
        return (self.frames // self.temporal_patch_size, side, side)

    @property
    def image_dim(self) -> int:
        """Input width of ``to_visual_latent``: h * w * dim (294912 for the release)."""
        return self.grid[1] * self.grid[2] * self.dim

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None) -> CTViTConfig:
        overrides = dict(overrides or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise VoxelFMError(
                f"{MODEL_NAME}: unknown overrides {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(known))}"
            )
        return cls(**{k: int(v) for k, v in overrides.items()})


# --- architecture (state-dict names as the release) ---------------------------------------


class _BiasFreeLayerNorm(nn.Module):
    """``attention.LayerNorm``: learned gain ``gamma``, fixed zero ``beta`` (a saved buffer)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class _PEG(nn.Module):
    """Position-generating depthwise 3^3 conv over the (t, h, w) grid, causal along t."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: Tensor, video_shape: tuple[int, int, int, int]) -> Tensor:
        # A plain reshape to (b, t, h, w, d) whatever the token order, as the release does.
        grid = x.reshape(*video_shape, -1).permute(0, 4, 1, 2, 3)
        grid = F.pad(grid, (1, 1, 1, 1, 2, 0))  # w, h symmetric; t: two frames before
        return self.dsconv(grid).permute(0, 2, 3, 4, 1).reshape(x.shape)


class _Attention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm = _BiasFreeLayerNorm(dim)
        # Kept for the release's keys, unused by self-attention: null key/values (none for
        # self-attention: zero-size) and the norm of a cross-attention context.
        self.null_kv = nn.Parameter(torch.zeros(heads, 0, dim_head))
        self.context_norm = _BiasFreeLayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        # The release computes keys/values from x *before* its norm (only q is normalised).
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q = self.to_q(self.norm(x))
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        logits = q @ k.transpose(-1, -2) * 8.0  # (b, heads, n, n); the release's scale = 8
        if attn_bias is not None:
            logits = logits + attn_bias
        out = logits.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _GEGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    inner = int(mult * (2 / 3) * dim)  # 1365 for dim 512
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, 2 * inner, bias=False),
        _GEGLU(),
        nn.Identity(),  # the release's Dropout slot keeps the key index of the last Linear
        nn.Linear(inner, dim, bias=False),
    )


class _Transformer(nn.Module):
    """``layers.i`` = [PEG, self-attention, (no cross-attention), feed-forward]; norm_out."""

    def __init__(self, config: CTViTConfig, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        _PEG(config.dim),
                        _Attention(config.dim, config.dim_head, config.heads),
                        nn.Identity(),  # cross-attention slot (None in the release)
                        _feed_forward(config.dim),
                    ]
                )
                for _ in range(depth)
            ]
        )
        self.norm_out = _BiasFreeLayerNorm(config.dim)

    def forward(
        self,
        x: Tensor,
        video_shape: tuple[int, int, int, int],
        attn_bias: Tensor | None = None,
    ) -> Tensor:
        for peg, attention, _, feed_forward in self.layers:
            x = peg(x, video_shape) + x
            x = attention(x, attn_bias) + x
            x = feed_forward(x) + x
        return self.norm_out(x)


class _ContinuousPositionBias(nn.Module):
    """Per-head bias from an MLP on signed-log relative (dh, dw) positions (SwinV2)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1)),
                nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)),
                nn.Linear(dim, heads),
            ]
        )

    def forward(self, h: int, w: int) -> Tensor:
        """-> (heads, h*w, h*w)."""
        device = self.net[2].weight.device
        positions = torch.stack(
            torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1
        ).reshape(-1, 2)
        relative = (positions[:, None, :] - positions[None, :, :]).float().to(device)
        bias = torch.sign(relative) * torch.log(relative.abs() + 1)
        for layer in self.net:
            bias = layer(bias)
        return bias.permute(2, 0, 1)


class _CosineCodebook(nn.Module):
    """vector-quantize-pytorch's CosineSimCodebook at inference: nearest row by cosine."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", F.normalize(torch.randn(1, codebook_size, dim), dim=-1))

    def forward(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """(N, d) -> (N, d) codebook rows, chosen by cosine similarity, returned as stored.

        The original normalises both the tokens and the codebook rows before the argmax
        (``CosineSimCodebook.forward``: ``l2norm(embed)``); its EMA update leaves trained rows
        below unit norm, so comparing against the raw rows would favour long rows. The
        quantised output is the stored row (``F.embedding(embed_ind, embed)``), unnormalised.
        """
        codebook = self.embed[0]
        unit_rows = F.normalize(codebook, dim=-1)
        flat = F.normalize(x, dim=-1)
        indices = torch.cat(
            [(part @ unit_rows.T).argmax(dim=-1) for part in flat.split(chunk)]
        )  # chunks keep the (N, codebook) similarity matrix small
        return codebook[indices]


class _VectorQuantize(nn.Module):
    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self._codebook = _CosineCodebook(codebook_size, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self._codebook(x.float()).to(x.dtype)


class CTViTEncoder(nn.Module):
    """CTViT's encoder: (B, 1, D, H, W) -> (B, t, h, w, dim) tokens (before / after VQ)."""

    def __init__(self, config: CTViTConfig) -> None:
        super().__init__()
        self.config = config
        patch_dim = config.temporal_patch_size * config.patch_size**2
        self.spatial_rel_pos_bias = _ContinuousPositionBias(config.dim, config.heads)
        self.to_patch_emb = nn.Sequential(
            nn.Identity(),  # the release's Rearrange slot (done in ``patchify``)
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, config.dim),
            nn.LayerNorm(config.dim),
        )
        self.enc_spatial_transformer = _Transformer(config, config.spatial_depth)
        self.enc_temporal_transformer = _Transformer(config, config.temporal_depth)
        self.vq = _VectorQuantize(config.codebook_size, config.dim)

    def patchify(self, x: Tensor) -> Tensor:
        """'b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)'."""
        b, c, d, h, w = x.shape
        pt, p = self.config.temporal_patch_size, self.config.patch_size
        x = x.reshape(b, c, d // pt, pt, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d // pt, h // p, w // p, -1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (encoder tokens, quantised tokens), both (B, t, h, w, dim)."""
        tokens = self.to_patch_emb(self.patchify(x))
        b, t, h, w, d = tokens.shape
        video_shape = (b, t, h, w)
        bias = self.spatial_rel_pos_bias(h, w).to(tokens.dtype)
        tokens = self.enc_spatial_transformer(tokens.reshape(b * t, h * w, d), video_shape, bias)
        tokens = tokens.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        tokens = self.enc_temporal_transformer(tokens, video_shape)
        tokens = tokens.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)
        quantised = self.vq(tokens.reshape(-1, d)).reshape(tokens.shape)
        return tokens, quantised


class CTCLIPImageEncoder(nn.Module):
    """``visual_transformer`` (CTViT encoder) and ``to_visual_latent`` of ``CTCLIP``."""

    def __init__(self, config: CTViTConfig) -> None:
        super().__init__()
        self.config = config
        self.visual_transformer = CTViTEncoder(config)
        self.to_visual_latent = nn.Linear(config.image_dim, config.latent_dim, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 1, D, H, W) -> (latent (B, latent_dim) unit norm, encoder tokens, quantised
        tokens (B, t, h, w, dim))."""
        tokens, quantised = self.visual_transformer(x)
        pooled = quantised.mean(dim=1).reshape(x.shape[0], -1)  # mean over t, then (h w d)
        return F.normalize(self.to_visual_latent(pooled), dim=-1), tokens, quantised


# --- extractor -------------------------------------------------------------------------------


class CTCLIPExtractor(ForeignExtractor):
    """CT-CLIP's image encoder with its preprocessing (see the module docstring)."""

    kind = "ct_clip"

    def __init__(
        self,
        model: CTCLIPImageEncoder,
        *,
        patch_tokens: str = "quantized",
        patch_size: int = 20,
        **base: Any,
    ) -> None:
        if patch_tokens not in PATCH_TOKEN_KINDS:
            raise VoxelFMError(f"{MODEL_NAME}: patch_tokens must be one of {PATCH_TOKEN_KINDS}")
        if int(patch_size) < 1:
            raise VoxelFMError(f"{MODEL_NAME}: patch_size must be >= 1, got {patch_size}")
        architecture = model.config
        super().__init__(
            embed_dim=architecture.latent_dim,
            patch_size=int(patch_size),
            model_name=MODEL_NAME,
            preprocessing={
                "hu_clip": list(HU_CLIP),
                "scale": f"1/{HU_SCALE:g}",
                "axes": "(D, H, W) = (Z, reversed X, reversed Y) (LPS-stored NIfTI order)",
                "model_spacing_mm_xyz": list(MODEL_SPACING_XYZ),
                "centre_pad_or_crop": list(architecture.input_size),
                "pad_value": PAD_VALUE,
            },
            extra={"architecture": asdict(architecture), "patch_tokens": patch_tokens},
            **base,
        )
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.architecture = architecture
        self.patch_tokens = patch_tokens

    def prepare(
        self, hu: Tensor, valid: Tensor | None = None
    ) -> tuple[Tensor, list[list[AxisMap]]]:
        """(B, 1, X, Y, Z) HU at ``spacing_mm`` -> (B, 1, D, H, W) model input, and per sample
        the maps of our voxel coordinates onto the model input's axes."""
        spacing = self.spacing_mm or MODEL_SPACING_XYZ
        inputs, all_maps = [], []
        for b in range(hu.shape[0]):
            box = valid_box(None if valid is None else valid[b], hu.shape[-3:])
            volume = hu[b, 0][box].to(self.device, torch.float32)  # (x, y, z) real voxels
            volume = volume.clamp(*HU_CLIP) / HU_SCALE
            maps = identity_maps((2, 0, 1))  # model (D, H, W) <- our (Z, X, Y)
            maps = [m.moved(-box[m.source].start) for m in maps]
            x = volume.permute(2, 0, 1).flip(1, 2)  # (Z, R->L, A->P): an LPS file's (k, i, j)
            maps[1] = maps[1].flipped(x.shape[1])
            maps[2] = maps[2].flipped(x.shape[2])
            size = [
                _resized_length(int(n), spacing[m.source], MODEL_SPACING_XYZ[m.source])
                for n, m in zip(x.shape, maps)
            ]
            x = resize_to(x[None, None], size, maps)
            x = center_pad_or_crop(x, self.architecture.input_size, PAD_VALUE, maps)
            inputs.append(x[0])
            all_maps.append(maps)
        return torch.stack(inputs), all_maps

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x, all_maps = self.prepare(hu, valid)
        with self.autocast():
            latent, tokens, quantised = self.model(x)
        grid_tokens = (quantised if self.patch_tokens == "quantized" else tokens).float()
        feature_maps = grid_tokens.permute(0, 4, 1, 2, 3)  # (B, dim, t, h, w)
        grid = [n // self.patch_size for n in hu.shape[-3:]]
        size = self.architecture.input_size
        patch = torch.stack(
            [
                sample_feature_grid(feature_maps[b], maps, size, grid, self.patch_size)
                for b, maps in enumerate(all_maps)
            ]
        )
        return latent.float(), patch


def _resized_length(n: int, ours_mm: float, target_mm: float) -> int:
    """``resize_array``'s new size, ``int(n * current / target)`` (float noise forgiven)."""
    return max(1, math.floor(n * ours_mm / target_mm + 1e-6))


def build_ct_clip(
    config: Mapping[str, Any], device: torch.device, precision: str
) -> CTCLIPExtractor:
    """Config: ``path`` (CT-CLIP_v2.pt) or ``random_weights: true``; optional ``name``,
    ``device``, ``spacing_mm`` (default (0.75, 0.75, 1.5), the model's), ``patch_tokens``
    ("quantized" | "encoder"), ``patch_size`` (20), ``overrides`` (architecture, for tests),
    ``seed`` (random weights)."""
    options = foreign_options(
        config, MODEL_NAME, optional=("patch_tokens", "patch_size", "overrides", "seed")
    )
    model, sha256 = build_encoder_model(
        options,
        "ct_clip",
        partial(CTCLIPImageEncoder, CTViTConfig.from_overrides(options.get("overrides"))),
        load=load_ct_clip_weights,
    )
    return CTCLIPExtractor(
        model,
        patch_tokens=options.get("patch_tokens", "quantized"),
        patch_size=int(options.get("patch_size", 20)),
        name=options.get("name", "ct_clip"),
        config=config,
        device=extractor_device(options, device),
        precision=precision,
        spacing_mm=spacing_option(options, MODEL_SPACING_XYZ),
        weights_sha256=sha256,
    )


def load_ct_clip_weights(model: CTCLIPImageEncoder, path: Any) -> str:
    """Strict load of the image encoder from the release's ``CTCLIP`` state dict."""
    return load_encoder_weights(
        model,
        path,
        model=MODEL_NAME,
        download_hint=DOWNLOAD_HINT,
        prefixes=("module.",),
        ignore_prefixes=(*IGNORED_PREFIXES, *(f"module.{p}" for p in IGNORED_PREFIXES)),
    )
