"""The VoxelFM 3D ViT backbone and its weight I/O."""

from .vision_transformer import (
    VIT_PRESETS,
    BackboneOutput,
    VisionTransformer3D,
    build_vit,
    layer_id_for_param,
)
from .weights import load_backbone, load_published_checkpoint, save_backbone

__all__ = [
    "VIT_PRESETS",
    "BackboneOutput",
    "VisionTransformer3D",
    "build_vit",
    "layer_id_for_param",
    "load_backbone",
    "load_published_checkpoint",
    "save_backbone",
]
