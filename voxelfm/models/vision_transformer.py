"""The VoxelFM backbone: a 3D ViT with Conv3d patches, 3D RoPE, CLS and register tokens.

Architecture and parameter names follow the reference implementation (rmaguado/VoxelFM, a
dinov2 fork) so published checkpoints load strictly and give the same features:

    (B, 1, X, Y, Z) --Conv3d(k=s=patch)--> (B, N, D) patch tokens, N = gx*gy*gz
        [masked patches replaced by mask_token]           (iBOT student only)
        prepend CLS (1) and register (R) tokens   ->  (B, 1 + R + N, D)
        depth x pre-norm Block (RoPE self-attention + GELU MLP, LayerScale, drop path)
        final LayerNorm

Token order (patch tokens, after the 1 + R prefix tokens) is C order over the patch grid:
patch (i, j, k) is token ``(i * gy + j) * gz + k``, the last input axis varying fastest.
For a canonical (X, Y, Z) = (R, A, S) volume, Z (superior) varies fastest and token n
covers voxels [i*p, (i+1)*p) x [j*p, (j+1)*p) x [k*p, (k+1)*p) with p = patch_size.

Axis order and published weights: the model has no fixed anatomical axes (the reference
pretrains on randomly axis-permuted crops), but the reference's own inference feeds arrays
as (z, y, x) (its NIfTI loader transposes), so reproducing its features exactly means
passing a canonical volume as ``x.permute(0, 1, 4, 3, 2)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .layers import LAYER_NORM_EPS, AttentionImpl, Block, PatchEmbed3D, RopePositionEmbedding3D

# The published VoxelFM ViT-B (reference configs/ssl_default_config.yaml, `student:`).
# "small" keeps base's head_dim of 72 (3D RoPE needs head_dim divisible by 6, which rules
# out the 2D ViT-S 384/6 = 64); "tiny" is a CPU demo: patch 8 turns a 32^3 crop into a
# 4^3 grid and 64^3 into 8^3, small enough for seconds-long CPU runs.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 4},
    "small": {"patch_size": 14, "embed_dim": 432, "depth": 12, "num_heads": 6},
    "base": {"patch_size": 14, "embed_dim": 864, "depth": 12, "num_heads": 12},
}

# Parameters that act before the first block; layer-wise lr decay treats them as layer 0.
_EMBEDDING_PARAMS = ("patch_embed", "cls_token", "register_tokens", "mask_token")


@dataclass
class BackboneOutput:
    """What the backbone returns; field names follow dinov2's output dict.

    Attributes:
        x_norm_clstoken: (B, D) final-norm CLS token, the global embedding.
        x_norm_regtokens: (B, R, D) final-norm register tokens.
        x_norm_patchtokens: (B, N, D) final-norm patch tokens, N = gx*gy*gz in grid order.
        x_prenorm: (B, 1 + R + N, D) all tokens before the final norm.
        masks: (B, N) the iBOT mask that was applied, or None.
        grid_size: (gx, gy, gz) patch grid of this crop.
    """

    x_norm_clstoken: Tensor
    x_norm_regtokens: Tensor
    x_norm_patchtokens: Tensor
    x_prenorm: Tensor
    masks: Tensor | None
    grid_size: tuple[int, int, int]

    def patch_grid(self) -> Tensor:
        """Patch tokens as a volume: (B, gx, gy, gz, D)."""
        batch, _, dim = self.x_norm_patchtokens.shape
        return self.x_norm_patchtokens.reshape(batch, *self.grid_size, dim)


# Lets DDP's output handling, torch.compile and other pytree utilities see the tensors inside.
pytree.register_dataclass(BackboneOutput)


class VisionTransformer3D(nn.Module):
    """3D ViT backbone. Construct through :func:`build_vit` unless you need a custom size."""

    def __init__(
        self,
        *,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        layerscale_init: float | None = 1e-5,
        rope_base: float = 100.0,
        rope_rescale_coords: float | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        attention_impl: AttentionImpl = "sdpa",
    ) -> None:
        """Defaults other than the size are the published VoxelFM settings.

        Args:
            patch_size: edge of the cubic patch in voxels; crops must be multiples of it.
            embed_dim, depth, num_heads: width, number of blocks, attention heads;
                embed_dim / num_heads must be divisible by 6 (3D RoPE).
            mlp_ratio: MLP hidden width / embed_dim.
            num_register_tokens: extra learnable tokens (Darcet et al. 2024) that soak up
                global scratch computation; 0 disables them (no ``register_tokens`` key).
            layerscale_init: initial LayerScale gain; None disables LayerScale.
            rope_base, rope_rescale_coords: see RopePositionEmbedding3D.
            qkv_bias, proj_bias, ffn_bias: biases of the attention and MLP linears.
            drop_path_rate: stochastic depth rate (only active in training mode).
            drop_path_uniform: same rate in every block (published setting) instead of a
                linear ramp from 0 at the first block to drop_path_rate at the last.
            attention_impl: ``"sdpa"`` (F.scaled_dot_product_attention) or ``"eager"``
                (explicit softmax(q k^T) v, a benchmark baseline). Same parameters and
                outputs either way, so it is an execution choice, not part of
                ``architecture``; change it later with :meth:`set_attention_impl`.
        """
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        # Everything needed to rebuild this module, saved next to our own checkpoints.
        self.architecture: dict[str, Any] = {
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "num_register_tokens": num_register_tokens,
            "layerscale_init": layerscale_init,
            "rope_base": rope_base,
            "rope_rescale_coords": rope_rescale_coords,
            "qkv_bias": qkv_bias,
            "proj_bias": proj_bias,
            "ffn_bias": ffn_bias,
            "drop_path_rate": drop_path_rate,
            "drop_path_uniform": drop_path_uniform,
        }
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens

        self.patch_embed = PatchEmbed3D(patch_size, embed_dim)
        self.rope_embed = RopePositionEmbedding3D(
            embed_dim, num_heads=num_heads, base=rope_base, rescale_coords=rope_rescale_coords
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            if num_register_tokens
            else None
        )
        if drop_path_uniform:
            drop_rates = [drop_path_rate] * depth
        else:
            drop_rates = torch.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                layerscale_init=layerscale_init,
                drop_path=rate,
                attention_impl=attention_impl,
            )
            for rate in drop_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        # (1, D), not (1, 1, D): the reference checkpoint's shape.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def set_attention_impl(self, attention_impl: AttentionImpl) -> None:
        """Switch every block between ``"sdpa"`` and ``"eager"`` attention in place."""
        for block in self.blocks:
            block.attn.attention_impl = attention_impl

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: CLS + registers."""
        return 1 + self.num_register_tokens

    def init_weights(self) -> None:
        """dinov2 / timm init: ViT linears trunc-normal(0.02), tiny random CLS/registers.

        The Conv3d patch projection keeps PyTorch's default init and the mask token stays
        zero, as in the reference.
        """
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def prepare_tokens_with_masks(
        self, x: Tensor, masks: Tensor | None = None
    ) -> tuple[Tensor, tuple[int, int, int]]:
        """(B, 1, X, Y, Z) -> tokens (B, 1 + R + N, D) and the patch grid (gx, gy, gz)."""
        self._check_input(x, masks)
        patch_tokens, grid_size = self.patch_embed(x)  # (B, N, D)
        # The residual stream stays in the parameter dtype (float32 under bf16 autocast),
        # as in the reference, where torch.cat promotes the bf16 patch tokens.
        patch_tokens = patch_tokens.to(self.cls_token.dtype)
        if masks is not None:
            patch_tokens = torch.where(masks.unsqueeze(-1), self.mask_token, patch_tokens)
        batch = x.shape[0]
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(batch, -1, -1))
        return torch.cat(prefix + [patch_tokens], dim=1), grid_size

    def forward(self, x: Tensor, masks: Tensor | None = None) -> BackboneOutput:
        """Embed a batch of crops.

        Args:
            x: (B, 1, X, Y, Z) float volumes; X, Y, Z multiples of patch_size, any shape.
            masks: optional (B, N) bool, True where the patch token is replaced by the
                learnable mask token before the blocks (iBOT student input).

        Returns:
            BackboneOutput with CLS (B, D), registers (B, R, D), patches (B, N, D).
        """
        tokens, grid_size = self.prepare_tokens_with_masks(x, masks)
        rope = self.rope_embed(grid_size)  # sin, cos: (N, head_dim) float32
        for block in self.blocks:
            tokens = block(tokens, rope, self.num_prefix_tokens)
        normed = self.norm(tokens)
        return BackboneOutput(
            x_norm_clstoken=normed[:, 0],
            x_norm_regtokens=normed[:, 1 : self.num_prefix_tokens],
            x_norm_patchtokens=normed[:, self.num_prefix_tokens :],
            x_prenorm=tokens,
            masks=masks,
            grid_size=grid_size,
        )

    def _check_input(self, x: Tensor, masks: Tensor | None) -> None:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(
                f"expected a (B, 1, X, Y, Z) single-channel volume batch, got {tuple(x.shape)}"
            )
        crop = tuple(x.shape[2:])
        if any(size % self.patch_size for size in crop):
            fitted = tuple(size - size % self.patch_size for size in crop)
            raise ValueError(
                f"crop size {crop} is not a multiple of the patch size {self.patch_size}; "
                f"crop or resample to e.g. {fitted}"
            )
        if masks is None:
            return
        num_patches = 1
        for size in crop:
            num_patches *= size // self.patch_size
        expected = (x.shape[0], num_patches)
        if masks.dtype != torch.bool or tuple(masks.shape) != expected:
            raise ValueError(
                f"masks must be bool of shape {expected} (batch, patches), "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )


def build_vit(preset: str, **overrides: Any) -> VisionTransformer3D:
    """Build a backbone from a named size in VIT_PRESETS, with constructor overrides.

    Example: ``build_vit("base", drop_path_rate=0.1)`` is the published student.
    """
    if preset not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; choose one of {sorted(VIT_PRESETS)}")
    valid = set(inspect.signature(VisionTransformer3D.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown ViT options {unknown}; valid options are {sorted(valid)}")
    return VisionTransformer3D(**{**VIT_PRESETS[preset], **overrides})


def layer_id_for_param(name: str, num_layers: int) -> int:
    """Depth of a backbone parameter for layer-wise learning-rate decay.

    Embeddings and the special tokens (patch_embed.*, cls_token, register_tokens,
    mask_token) are layer 0, ``blocks.i.*`` is layer i + 1, everything else (the final
    norm, and heads if passed) is num_layers + 1, as in dinov2's get_vit_lr_decay_rate.
    Accepts names with a leading ``backbone.`` and DDP ``module.`` components.
    The lr multiplier is then ``decay ** (num_layers + 1 - layer_id)``.
    """
    parts = [part for part in name.split(".") if part != "module"]
    if parts and parts[0] == "backbone":
        parts = parts[1:]
    if not parts:
        raise ValueError(f"not a parameter name: {name!r}")
    if parts[0] in _EMBEDDING_PARAMS:
        return 0
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    return num_layers + 1
