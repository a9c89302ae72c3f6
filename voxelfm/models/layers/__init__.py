"""Building blocks of the 3D ViT backbone."""

from .attention import ATTENTION_IMPLS, Attention, AttentionImpl, eager_attention
from .block import LAYER_NORM_EPS, Block
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed3D
from .rope import RopePositionEmbedding3D, apply_rope, patch_grid_coordinates, rope_periods

__all__ = [
    "ATTENTION_IMPLS",
    "LAYER_NORM_EPS",
    "Attention",
    "AttentionImpl",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed3D",
    "RopePositionEmbedding3D",
    "apply_rope",
    "eager_attention",
    "patch_grid_coordinates",
    "rope_periods",
]
