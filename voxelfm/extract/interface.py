"""The feature-extractor interface every backbone implements, and what its factories share.

A backbone kind is a factory ``(config, device, precision) -> FeatureExtractor`` (see
``voxelfm.extract.backbones`` for the registry of kinds). This module is what the kinds'
modules (``vit``, ``handcrafted``, ``foreign``) build on, so it imports none of them.

Every extractor takes **HU** (float32, ``(B, 1, X, Y, Z)`` on the canonical RAS grid, axes as
in ``voxelfm.conventions``) and does its own intensity normalisation, so the probes never
need to know what a backbone expects.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from voxelfm.errors import VoxelFMError
from voxelfm.utils.jsonable import to_jsonable

Factory = Callable[[Mapping[str, Any], torch.device, str], "FeatureExtractor"]

PRECISIONS = ("fp32", "bf16")


class FeatureExtractor(ABC):
    """A frozen backbone: HU volumes in, a global vector and (optionally) patch tokens out.

    Attributes:
        kind: registry name of the implementation.
        name: the backbone's name in reports and embedding stores.
        embed_dim: D, the width of the global vector and of every patch token.
        patch_size: edge in voxels of the cubic patch behind one token, or None when the
            extractor has no patch tokens (then only whole-volume extraction applies).
        spacing_mm: the voxel size the extractor expects, or None for any.
        device: where ``forward`` runs.
        precision: "bf16" runs ``forward`` under bf16 autocast (see :meth:`autocast`; the
            kinds set it to "fp32" off CUDA), "fp32" as it is.
        config: the backbone config it was built from (JSON-serialisable), recorded in
            embedding stores (under the key ``spec``, the name stores have always used).
    """

    kind: ClassVar[str] = ""
    name: str
    embed_dim: int
    patch_size: int | None
    spacing_mm: tuple[float, float, float] | None = None
    device: torch.device
    precision: str = "fp32"
    config: dict[str, Any]

    @abstractmethod
    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Embed a batch.

        Args:
            hu: (B, 1, X, Y, Z) float32 HU; X, Y, Z multiples of ``patch_size`` (if set).
            valid: optional (B, 1, X, Y, Z) bool, False on padding voxels. Extractors may
                ignore it (the ViTs do: padding is air, which they see as air); the
                handcrafted baseline computes its statistics over valid voxels only.

        Returns:
            cls: (B, D) float32 global vectors.
            patch: (B, gx, gy, gz, D) float32 patch tokens, gx = X / patch_size..., or None.
        """

    def __call__(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        with torch.inference_mode():
            return self.forward(hu, valid)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``precision`` is "bf16", else nothing."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description for provenance (stored with the embeddings)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "embed_dim": int(self.embed_dim),
            "patch_size": None if self.patch_size is None else int(self.patch_size),
            "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
            "spec": to_jsonable(self.config),
            **self._extra_description(),
        }

    def _extra_description(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, embed_dim={self.embed_dim}, "
            f"patch_size={self.patch_size}, device={self.device})"
        )


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is a user error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise VoxelFMError(f"unknown device {device!r}; use auto, cpu or cuda") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VoxelFMError(f"device {device!r} requested but no CUDA GPU is available")
    return resolved


def backbone_options(
    config: Mapping[str, Any], *, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, Any]:
    """The config's options (without ``kind``), checked against what the kind accepts."""
    kind = config.get("kind")
    options = {key: value for key, value in config.items() if key != "kind"}
    missing = [key for key in required if key not in options]
    if missing:
        raise VoxelFMError(f"{kind} backbone config is missing {', '.join(missing)}")
    unknown = sorted(set(options) - set(required) - set(optional))
    if unknown:
        raise VoxelFMError(
            f"{kind} backbone config has unknown keys {', '.join(unknown)}; "
            f"accepted: {', '.join((*required, *optional))}"
        )
    return options


def parse_spacing_mm(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3 or min(values) <= 0:
        raise VoxelFMError(f"spacing_mm must be a positive number or three of them, got {value!r}")
    return tuple(values)  # type: ignore[return-value]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
