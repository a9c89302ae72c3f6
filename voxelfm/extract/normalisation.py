"""HU -> network input: the one intensity normalisation shared by pretraining and extraction.

Pretraining (``voxelfm.ssl.multicrop``) and feature extraction both call
:func:`standardise_hu`, so a backbone always sees at inference exactly the input mapping it
was trained with: HU clipped to ``hu_clip``, then ``(hu - mean) / std``. The parameters of an
exported backbone come from the ``crops`` section of the training config saved in its
sidecar (:func:`normalisation_from_config`).

Only torch is imported here: the multi-crop sampler imports this module in every
data-loading worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from voxelfm.hu import standardise_hu


@dataclass(frozen=True)
class HUNormalisation:
    """The parameters of :func:`standardise_hu`; defaults are the VoxelFM reference's."""

    hu_clip: tuple[float, float] | None = (-1000.0, 1900.0)
    mean: float = -573.8
    std: float = 461.3

    def __post_init__(self) -> None:
        if self.hu_clip is not None:
            low, high = (float(v) for v in self.hu_clip)
            if not low < high:
                raise ValueError(f"hu_clip must be (low, high) with low < high, got {self.hu_clip}")
            object.__setattr__(self, "hu_clip", (low, high))
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    def __call__(self, hu: torch.Tensor) -> torch.Tensor:
        return standardise_hu(hu, self.hu_clip, self.mean, self.std)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> HUNormalisation:
        """From ``{"hu_clip": [lo, hi] | null, "mean": m, "std": s}`` (missing keys: defaults)."""
        values = dict(values or {})
        unknown = sorted(set(values) - {"hu_clip", "mean", "std"})
        if unknown:
            raise ValueError(f"unknown normalisation keys {unknown}; use hu_clip, mean, std")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hu_clip": None if self.hu_clip is None else list(self.hu_clip),
            "mean": self.mean,
            "std": self.std,
        }


def normalisation_from_config(config: Mapping[str, Any] | None) -> HUNormalisation:
    """The normalisation a backbone was trained with, from its resolved training config.

    Reads the ``crops`` section through ``MultiCropSettings.from_config`` (the parser training
    used), so recipe overrides of ``hu_clip`` / ``normalisation_mean`` / ``normalisation_std``
    are honoured; a config without a ``crops`` section gets the recipe defaults.
    """
    from voxelfm.ssl.multicrop import MultiCropSettings

    crops = (config or {}).get("crops") or {}
    recipe = MultiCropSettings.from_config(crops)
    return HUNormalisation(
        hu_clip=recipe.hu_clip, mean=recipe.normalisation_mean, std=recipe.normalisation_std
    )
