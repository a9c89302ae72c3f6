"""Backbones as plug-ins: one feature-extractor interface behind every probe.

A backbone is named in the workflow config by a mapping with a ``kind`` and the options of
that kind, and built with :func:`build_extractor`::

    {"kind": "voxelfm", "path": "results/demo/pretrain/teacher_backbone"}
    {"kind": "published_voxelfm", "path": "/x/teacher_checkpoint.pth", "preset": "base"}
    {"kind": "random_init", "like": "results/demo/pretrain/teacher_backbone", "seed": 0}
    {"kind": "random_init", "preset": "tiny", "overrides": {"depth": 2}, "seed": 0}
    {"kind": "handcrafted", "bins": 32, "patch_size": 8}

Every config also accepts ``name`` (defaults to the kind). Kinds live in the open registry
``BACKBONE_KINDS`` (kind -> factory ``(config, device, precision) -> FeatureExtractor``);
:func:`register_backbone` adds one (e.g. adapters for other CT foundation models) without
touching the extraction or probe code.

The interface and what the kinds' factories share live in ``voxelfm.extract.interface``.

Built-in kinds, each documented in its module:

* ``voxelfm``, ``published_voxelfm``, ``random_init``: the 3D ViT (``voxelfm.extract.vit``);
* ``handcrafted``: HU histogram and statistics (``voxelfm.extract.handcrafted``);
* ``merlin``, ``ct_fm``, ``m3d_clip``, ``ct_clip``, ``radfm``: other CT foundation models
  (``voxelfm.extract.foreign``).

Optional common keys: ``spacing_mm`` (the voxel size the backbone expects; a volume read
from a file is resampled to it; None = the store's default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from voxelfm.errors import VoxelFMError
from voxelfm.extract import handcrafted, vit
from voxelfm.extract.foreign import ct_clip, ct_fm, m3d_clip, merlin, radfm
from voxelfm.extract.interface import PRECISIONS, Factory, FeatureExtractor, resolve_device

BACKBONE_KINDS: dict[str, Factory] = {
    "voxelfm": vit.build_voxelfm,
    "published_voxelfm": vit.build_published,
    "random_init": vit.build_random_init,
    "handcrafted": handcrafted.build_handcrafted,
    "merlin": merlin.build_merlin,
    "ct_fm": ct_fm.build_ct_fm,
    "m3d_clip": m3d_clip.build_m3d_clip,
    "ct_clip": ct_clip.build_ct_clip,
    "radfm": radfm.build_radfm,
}


def register_backbone(kind: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
    """Decorator adding ``factory(config, device, precision) -> FeatureExtractor`` as ``kind``."""

    def decorate(factory: Factory) -> Factory:
        if kind in BACKBONE_KINDS and not replace:
            raise ValueError(f"backbone kind {kind!r} is already registered")
        BACKBONE_KINDS[kind] = factory
        return factory

    return decorate


def build_extractor(
    config: Mapping[str, Any],
    device: str | torch.device = "auto",
    *,
    precision: str = "fp32",
) -> FeatureExtractor:
    """Build the extractor a backbone config names (see the module docstring for the kinds).

    Args:
        config: mapping with ``kind`` and that kind's options.
        device: "auto" (cuda if available), "cpu", "cuda" or a torch.device.
        precision: "fp32", or "bf16" for autocast on CUDA (CPU always runs fp32).

    Raises:
        VoxelFMError (one line): unknown kind or option; InputError naming the path for a
        missing or unusable checkpoint.
    """
    if not isinstance(config, Mapping):
        raise VoxelFMError(f"backbone config must be a mapping with a 'kind', got {config!r}")
    kind = config.get("kind")
    if kind not in BACKBONE_KINDS:
        raise VoxelFMError(
            f"unknown backbone kind {kind!r}; registered kinds: {', '.join(sorted(BACKBONE_KINDS))}"
        )
    if precision not in PRECISIONS:
        raise VoxelFMError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return BACKBONE_KINDS[kind](dict(config), resolve_device(device), precision)
