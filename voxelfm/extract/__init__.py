"""Frozen-feature extraction: backbones as plug-ins, whole-volume or sliding-window
extraction, and the Zarr embedding store the probes read.

* ``backbones``: the :class:`FeatureExtractor` interface, the ``BACKBONE_KINDS`` registry
  (kind name -> factory) and :func:`build_extractor` (config spec -> extractor);
* ``extractor``: :func:`extract_features` (one volume, array or CT file -> :class:`Features`);
* ``store``: :func:`write_embeddings`, :class:`EmbeddingStore`, :func:`embed_store`;
* ``normalisation``: the HU -> network-input mapping shared with pretraining.

Names are resolved lazily so ``import voxelfm.extract`` (and the multi-crop sampler, which
imports ``normalisation``) does not pull in zarr, SimpleITK or the models.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKBONE_KINDS": "backbones",
    "FeatureExtractor": "backbones",
    "build_extractor": "backbones",
    "register_backbone": "backbones",
    "resolve_device": "backbones",
    "Features": "extractor",
    "extract_features": "extractor",
    "EmbeddingRecord": "store",
    "EmbeddingStore": "store",
    "embed_store": "store",
    "write_embeddings": "store",
    "HUNormalisation": "normalisation",
    "standardise_hu": "normalisation",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
