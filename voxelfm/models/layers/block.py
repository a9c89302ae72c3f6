"""Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

from torch import Tensor, nn

from .attention import Attention, AttentionImpl
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp

# nn.LayerNorm's default, written out because published weights were trained with it.
LAYER_NORM_EPS = 1e-5


class Block(nn.Module):
    """One ViT layer. Submodule names (norm1, attn, ls1, norm2, mlp, ls2) are the checkpoint
    keys of dinov2 and the VoxelFM reference."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path: float = 0.0,
        attention_impl: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attention_impl=attention_impl
        )
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], num_prefix_tokens: int) -> Tensor:
        """(B, P + N, D) -> (B, P + N, D); see Attention for rope and num_prefix_tokens."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope, num_prefix_tokens)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
