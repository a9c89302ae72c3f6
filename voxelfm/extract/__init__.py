"""Frozen-feature extraction: backbones as plug-ins, whole-volume or sliding-window
extraction, and the Zarr embedding store the probes read.

* ``interface``: the :class:`FeatureExtractor` interface and what the kinds' factories share;
* ``backbones``: the ``BACKBONE_KINDS`` registry (kind name -> factory) and
  :func:`build_extractor` (backbone config -> extractor);
* ``vit``, ``handcrafted``, ``foreign``: the kinds (the 3D ViT, the HU-statistics baseline,
  other CT foundation models);
* ``extractor``: :func:`extract_features` (one volume, array or CT file -> :class:`Features`);
* ``store``: :func:`write_embeddings`, :class:`EmbeddingStore`;
* ``embed``: :func:`embed_store` (shard stores -> embedding store, ``voxelfm embed``);
* ``normalisation``: the HU -> network-input mapping shared with pretraining.

Names are resolved lazily so ``import voxelfm.extract`` (and the multi-crop sampler, which
imports ``normalisation``) does not pull in zarr, SimpleITK or the models.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKBONE_KINDS": "backbones",
    "FeatureExtractor": "interface",
    "build_extractor": "backbones",
    "register_backbone": "backbones",
    "resolve_device": "interface",
    "Features": "extractor",
    "extract_features": "extractor",
    "EmbeddingRecord": "store",
    "EmbeddingStore": "store",
    "embed_store": "embed",
    "write_embeddings": "store",
    "HUNormalisation": "normalisation",
    "standardise_hu": "normalisation",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
