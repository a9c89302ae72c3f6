"""RadFM's 3D ViT vision encoder (Wu et al. 2023, chaoyi-wu/RadFM) behind our extractor API.

Architecture (written from the release's ``src/Model/RadFM/vit_3d.py``,
``position_encoding.py`` and ``my_embedding_layer.py``): ``MyEmbedding.vision_encoder`` is
``ViT(image_size=512, frames=512, image_patch_size=32, frame_patch_size=4, dim=768, depth=12,
heads=8, mlp_dim=2048, channels=3)`` (dim_head 64, so attention width 512):

* patch embedding: (B, 3, H, W, D) cut into 32 x 32 x 4 patches flattened in
  (p1, p2, pf, c) order, then LayerNorm(12288) -> Linear(12288, 768) -> LayerNorm(768);
* learned 3D position embedding: three tables (16, 16 and 128 rows of 256) for the H, W, D
  patch index, concatenated to 768; a grid of h patches uses rows
  ``(i + 1) * (16 // h) - 1`` (the release's ``PositionEmbeddingLearned3d``);
* 12 pre-norm blocks: LayerNorm -> attention (to_qkv without bias, to_out) and LayerNorm ->
  Linear(768, 2048) -> GELU -> Linear(2048, 768); no final norm, no CLS token.

The perceiver resampler and the language model that follow it in RadFM are not part of this
extractor. Released keys: ``embedding_layer.vision_encoder.<...>`` in ``pytorch_model.bin``;
everything else (``lang_model.``, ``embedding_layer.perceiver.``, ``embedding_layer.fc.``,
``embedding_layer.bert_model.``, ...) is ignored.

Embedding (our choice; RadFM has no global image vector of its own): the mean of the ViT's
output tokens, 768-d. Patch tokens: the ViT grid (anisotropic: the in-plane patch spans
FOV/8 at 256 px, the depth patch 4 resized slices) resampled trilinearly onto our cubic grid
of ``patch_size`` voxels (default 16) through the resize geometry.

Preprocessing (the release feeds radiology images as 3-channel, [0, 1], resized volumes;
the 3D inference recipe used with it resizes to 256 x 256 x (up to 64) slices):

* axes: H = rows of an axial slice in radiological display (anterior -> posterior, our Y
  reversed), W = columns (patient right -> left, our X reversed), D = slices (our Z,
  inferior -> superior);
* intensity: ``hu_window`` [lo, hi] -> clip and scale to [0, 1]; default None = per-volume
  min-max over the real (non-padding) voxels, as RadFM's 3D inference examples do;
* repeat to 3 channels; resize with ``F.interpolate``'s default mode, nearest, as the
  release's 3D collate does (``src/train.py``, ``src/test.py``: ``interpolate(s, size=...)``
  with no mode; its stored training arrays were zoomed with order 0), to ``image_size``
  (256) in plane and to the multiple of 4 in [4, ``max_frames``] nearest to the slice
  count, ties going to the smaller depth (the release's loop keeps the first of equally
  near candidates). The token geometry treats the resize as ``align_corners=False``
  scaling, which nearest sampling follows to within half a voxel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    extractor_device,
    foreign_options,
    load_encoder_weights,
    resize_to,
    sample_feature_grid,
    spacing_option,
    valid_box,
)

MODEL = "RadFM"
DOWNLOAD_HINT = (
    "pytorch_model.bin of the RadFM release (Hugging Face repository chaoyi-wu/RadFM, "
    "unzip the archive first)"
)
PREFIXES = ("module.", "embedding_layer.", "vision_encoder.")
IGNORE_PREFIXES = (
    "lang_model.",
    "embedding_layer.weight",
    "embedding_layer.figure_token_weight",
    "embedding_layer.bert",
    "embedding_layer.perceiver.",
    "embedding_layer.fc.",
    "embedding_layer.cls_head.",
    "embedding_layer.output_upscaling.",
    "embedding_layer.transformer_decoder",
)
RELEASE = {
    "image_size": 512,
    "frames": 512,
    "image_patch_size": 32,
    "frame_patch_size": 4,
    "dim": 768,
    "depth": 12,
    "heads": 8,
    "dim_head": 64,
    "mlp_dim": 2048,
    "channels": 3,
}


class PositionEmbedding3d(nn.Module):
    """Learned per-axis position tables, concatenated (release ``PositionEmbeddingLearned3d``)."""

    def __init__(self, features: int, h_patches: int, w_patches: int, d_patches: int) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(h_patches, features)
        self.col_embed = nn.Embedding(w_patches, features)
        self.dep_embed = nn.Embedding(d_patches, features)
        for table in (self.row_embed, self.col_embed, self.dep_embed):
            nn.init.uniform_(table.weight)

    def forward(self, h: int, w: int, d: int) -> Tensor:
        """(h * w * d, 3 * features) in (h, w, d) raster order."""
        device = self.row_embed.weight.device

        def rows(n: int, table: nn.Embedding) -> Tensor:
            # A shorter grid uses evenly strided rows of the table, ending at its last row.
            index = (torch.arange(n, device=device) + 1) * (table.num_embeddings // n) - 1
            return table(index)

        x = rows(h, self.row_embed)[:, None, None].expand(h, w, d, -1)
        y = rows(w, self.col_embed)[None, :, None].expand(h, w, d, -1)
        z = rows(d, self.dep_embed)[None, None, :].expand(h, w, d, -1)
        return torch.cat([x, y, z], dim=-1).reshape(h * w * d, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, N, dim)
        batch, tokens, _ = x.shape
        q, k, v = (
            t.reshape(batch, tokens, self.heads, -1).transpose(1, 2)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # Indices 0 and 3 as the release's Sequential (Linear, GELU, Dropout, Linear, Dropout).
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(dim, Attention(dim, heads, dim_head)),
                    PreNorm(dim, FeedForward(dim, mlp_dim)),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for attention, feed_forward in self.layers:
            x = attention(x) + x
            x = feed_forward(x) + x
        return x


class RadFMViT3D(nn.Module):
    """RadFM's vision encoder; state-dict keys as the release's ``vision_encoder``."""

    def __init__(
        self,
        image_size: int = 512,
        frames: int = 512,
        image_patch_size: int = 32,
        frame_patch_size: int = 4,
        dim: int = 768,
        depth: int = 12,
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int = 2048,
        channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % image_patch_size or frames % frame_patch_size or dim % 3:
            raise ValueError("image_size/frames must be multiples of the patch sizes, dim of 3")
        self.patch = (image_patch_size, image_patch_size, frame_patch_size)
        self.channels = channels
        self.dim = dim
        patch_dim = channels * image_patch_size**2 * frame_patch_size
        self.to_patch_embedding = nn.Sequential(
            nn.Identity(),  # index 0 is the release's einops Rearrange (no parameters)
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        grid = image_size // image_patch_size
        self.pos_embedding = PositionEmbedding3d(dim // 3, grid, grid, frames // frame_patch_size)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W, D) in [0, 1] -> (B, h, w, d, dim) output tokens on the patch grid."""
        batch, channels, height, width, depth = x.shape
        p1, p2, pf = self.patch
        h, w, d = height // p1, width // p2, depth // pf
        # b c (h p1) (w p2) (d pf) -> b (h w d) (p1 p2 pf c), the release's patch layout
        x = x.reshape(batch, channels, h, p1, w, p2, d, pf)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(batch, h * w * d, -1)
        x = self.to_patch_embedding(x) + self.pos_embedding(h, w, d)
        return self.transformer(x).reshape(batch, h, w, d, self.dim)


def target_depth(slices: int, frame_patch: int = 4, max_frames: int = 64) -> int:
    """Slice count after resizing, as the release's collate picks it: the multiple of
    ``frame_patch`` in [frame_patch, max_frames] nearest to ``slices``; on a tie the smaller
    (its loop over ascending candidates replaces the pick only when strictly nearer)."""
    candidates = range(frame_patch, max_frames + 1, frame_patch)
    return min(candidates, key=lambda depth: (abs(depth - slices), depth))


def preprocess(
    hu: Tensor,
    *,
    image_size: int = 256,
    max_frames: int = 64,
    frame_patch: int = 4,
    hu_window: Sequence[float] | None = None,
    maps: list[AxisMap] | None = None,
) -> Tensor:
    """(1, X, Y, Z) canonical HU -> (3, image_size, image_size, D) RadFM input in [0, 1]."""
    if hu_window is None:
        low, high = float(hu.min()), float(hu.max())
    else:
        low, high = (float(v) for v in hu_window)
    x = ((hu.clamp(low, high) - low) / max(high - low, 1e-6)).clamp(0, 1)
    sizes = hu.shape[-3:]
    x = x.permute(0, 2, 1, 3).flip(1, 2)  # (A->P rows, R->L columns, S slices)
    if maps is not None:
        maps[0] = maps[0].flipped(int(sizes[1]))
        maps[1] = maps[1].flipped(int(sizes[0]))
    size = (image_size, image_size, target_depth(int(sizes[2]), frame_patch, max_frames))
    x = resize_to(x[None], size, maps=maps, mode="nearest")[0]
    return x.expand(3, -1, -1, -1)


class RadFMExtractor(ForeignExtractor):
    """RadFM vision encoder: mean ViT token and resampled patch tokens (see module doc)."""

    kind = "radfm"

    def __init__(
        self,
        model: RadFMViT3D,
        *,
        image_size: int,
        max_frames: int,
        hu_window: Sequence[float] | None,
        patch_size: int,
        **base: Any,
    ) -> None:
        super().__init__(embed_dim=model.dim, patch_size=patch_size, model_name=MODEL, **base)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.max_frames = int(max_frames)
        self.hu_window = None if hu_window is None else tuple(float(v) for v in hu_window)

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        hu = hu.to(self.device, torch.float32)
        batch, _, *shape = hu.shape
        p = int(self.patch_size)
        grid = [n // p for n in shape]
        cls, patch = [], []
        for row in range(batch):  # depth after resizing differs per sample
            box = valid_box(None if valid is None else valid[row], shape)
            # Model axes (H, W, D) <- our (Y, X, Z) of the box (flips added by preprocess).
            maps = [
                AxisMap(source=1, shift=-box[1].start),
                AxisMap(source=0, shift=-box[0].start),
                AxisMap(source=2, shift=-box[2].start),
            ]
            x = preprocess(
                hu[row][(slice(None), *box)],
                image_size=self.image_size,
                max_frames=self.max_frames,
                frame_patch=self.model.patch[2],
                hu_window=self.hu_window,
                maps=maps,
            )
            with self.autocast():
                tokens = self.model(x[None])[0].float()  # (h, w, d, dim)
            cls.append(tokens.mean(dim=(0, 1, 2)))
            features = tokens.permute(3, 0, 1, 2)
            patch.append(sample_feature_grid(features, maps, x.shape[1:], grid, p))
        return torch.stack(cls), torch.stack(patch)

    def _extra_description(self) -> dict[str, Any]:
        return {**super()._extra_description(), "embedding": "mean of the ViT output tokens"}


def build_radfm(config: Mapping[str, Any], device: torch.device, precision: str) -> RadFMExtractor:
    """Config options: path | random_weights, name, device, spacing_mm (None), image_size (256),
    max_frames (64), hu_window (None = min-max), patch_size (16), overrides (of RadFMViT3D's
    arguments, for tests), seed."""
    options = foreign_options(
        config,
        MODEL,
        optional=("image_size", "max_frames", "hu_window", "patch_size", "overrides", "seed"),
    )
    architecture = {**RELEASE, **dict(options.get("overrides") or {})}
    model, sha = build_encoder_model(
        options,
        "radfm",
        partial(RadFMViT3D, **architecture),
        load=partial(
            load_encoder_weights,
            model=MODEL,
            download_hint=DOWNLOAD_HINT,
            prefixes=PREFIXES,
            ignore_prefixes=IGNORE_PREFIXES,
        ),
    )
    image_size = int(options.get("image_size", 256))
    max_frames = int(options.get("max_frames", 64))
    if image_size % model.patch[0] or image_size > architecture["image_size"]:
        raise VoxelFMError(
            f"radfm: image_size must be a multiple of {model.patch[0]} and at most "
            f"{architecture['image_size']}, got {image_size}"
        )
    if max_frames % model.patch[2] or max_frames > architecture["frames"]:
        raise VoxelFMError(
            f"radfm: max_frames must be a multiple of {model.patch[2]} and at most "
            f"{architecture['frames']}, got {max_frames}"
        )
    hu_window = options.get("hu_window")
    if hu_window is not None and (len(hu_window) != 2 or not hu_window[0] < hu_window[1]):
        raise VoxelFMError(f"radfm: hu_window must be [low, high] with low < high, got {hu_window}")
    return RadFMExtractor(
        model,
        image_size=image_size,
        max_frames=max_frames,
        hu_window=hu_window,
        patch_size=int(options.get("patch_size", 16)),
        name=options.get("name", "radfm"),
        config=config,
        device=extractor_device(options, device),
        precision=precision,
        spacing_mm=spacing_option(options, None),
        weights_sha256=sha,
        preprocessing={
            "axes": "H = A->P (our Y reversed), W = R->L (our X reversed), D = our Z",
            "intensity": "min-max to [0, 1]"
            if hu_window is None
            else f"clip {hu_window} -> [0, 1]",
            "channels": 3,
            "resize": f"nearest to {image_size} x {image_size} x the multiple of 4 nearest to Z "
            f"in [4, {max_frames}] (ties down)",
            "source": "chaoyi-wu/RadFM src/Model/RadFM (vit_3d.py, my_embedding_layer.py)",
        },
    )
