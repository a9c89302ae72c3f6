"""Building blocks of the 3D ViT backbone."""

from .attention import Attention
from .block import LAYER_NORM_EPS, Block
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed3D
from .rope import RopePositionEmbedding3D, apply_rope, patch_grid_coordinates, rope_periods

__all__ = [
    "LAYER_NORM_EPS",
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed3D",
    "RopePositionEmbedding3D",
    "apply_rope",
    "patch_grid_coordinates",
    "rope_periods",
]
