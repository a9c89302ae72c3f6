"""The ``handcrafted`` backbone: an HU histogram and intensity statistics, no learning.

The baseline every learned backbone has to beat: what can a probe do with the intensity
distribution alone? Config keys: ``bins`` (32) equal-width histogram bins over the clip range
``hu_range`` (the canonical HU range), ``patch_size`` (8): the same vector is computed per
``patch_size``-voxel block as patch tokens, so dense probes can use it too; ``name`` and
``spacing_mm`` as every kind (``voxelfm.extract.backbones``). The vector is described in
:class:`HandcraftedExtractor`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from voxelfm.conventions import HU_MAX, HU_MIN
from voxelfm.errors import VoxelFMError
from voxelfm.extract.interface import FeatureExtractor, backbone_options, parse_spacing_mm

# Tissue classes as a partition of the HU axis: [low, high) in HU (air includes everything
# below -900, bone everything from 300 up, so the fractions sum to 1).
TISSUE_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("air", -float("inf"), -900.0),
    ("lung", -900.0, -200.0),
    ("fat", -200.0, -30.0),
    ("soft", -30.0, 300.0),
    ("bone", 300.0, float("inf")),
)
PERCENTILES: tuple[float, ...] = (5.0, 25.0, 50.0, 75.0, 95.0)
KHU = 1000.0  # HU statistics are reported in units of 1000 HU so every feature is O(1)


class HandcraftedExtractor(FeatureExtractor):
    """HU histogram and intensity statistics, globally (CLS) and per block (patch tokens).

    The vector of a set of voxels (HU clipped to ``hu_range``), in this order:

    * ``hist_0 .. hist_{bins-1}``: fraction of voxels in each of ``bins`` equal-width bins
      spanning ``hu_range`` (the top value falls in the last bin);
    * ``mean_khu``, ``std_khu``: mean and population standard deviation, in 1000 HU;
    * ``p05_khu .. p95_khu``: percentiles 5, 25, 50, 75, 95 (linear interpolation, as
      numpy's default), in 1000 HU;
    * ``frac_air``, ``frac_lung``, ``frac_fat``, ``frac_soft``, ``frac_bone``: fractions of
      voxels in the HU classes of ``TISSUE_CLASSES`` (a partition: they sum to 1).

    Only ``valid`` voxels count (padding does not), and a set with no valid voxel gets the
    zero vector. Patch token (i, j, k) is the vector of block
    ``[i*p, (i+1)*p) x [j*p, (j+1)*p) x [k*p, (k+1)*p)``, p = ``patch_size``.
    """

    kind = "handcrafted"

    def __init__(
        self,
        *,
        bins: int = 32,
        patch_size: int = 8,
        hu_range: tuple[float, float] = (HU_MIN, HU_MAX),
        name: str = "handcrafted",
        config: Mapping[str, Any] | None = None,
        device: torch.device | str = "cpu",
        spacing_mm: tuple[float, float, float] | None = None,
    ) -> None:
        if int(bins) < 1 or int(patch_size) < 1:
            raise VoxelFMError(
                f"handcrafted: bins and patch_size must be >= 1, got {bins}, {patch_size}"
            )
        low, high = (float(v) for v in hu_range)
        if not low < high:
            raise VoxelFMError(
                f"handcrafted: hu_range must be (low, high) with low < high, got {hu_range}"
            )
        self.bins = int(bins)
        self.patch_size = int(patch_size)
        self.hu_range = (low, high)
        self.name = name
        self.config = dict(config or {"kind": "handcrafted"})
        self.device = torch.device(device)
        self.spacing_mm = spacing_mm
        self.feature_names = (
            [f"hist_{i}" for i in range(self.bins)]
            + ["mean_khu", "std_khu"]
            + [f"p{int(q):02d}_khu" for q in PERCENTILES]
            + [f"frac_{tissue}" for tissue, _, _ in TISSUE_CLASSES]
        )
        self.embed_dim = len(self.feature_names)

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        hu = hu.to(self.device, torch.float32).clamp(*self.hu_range)
        batch, _, *shape = hu.shape
        valid = (
            torch.ones_like(hu, dtype=torch.bool)
            if valid is None
            else valid.to(self.device, torch.bool)
        )
        cls = self.describe_voxels(hu.reshape(batch, -1), valid.reshape(batch, -1))
        p = self.patch_size
        if any(size % p for size in shape):
            raise ValueError(f"volume shape {tuple(shape)} is not a multiple of the patch size {p}")
        grid = tuple(size // p for size in shape)

        def blocks(x: Tensor) -> Tensor:  # (B, 1, X, Y, Z) -> (B * gx * gy * gz, p^3)
            x = x.reshape(batch, grid[0], p, grid[1], p, grid[2], p)
            return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, p**3)

        patch = self.describe_voxels(blocks(hu), blocks(valid))
        return cls, patch.reshape(batch, *grid, self.embed_dim)

    def describe_voxels(self, values: Tensor, valid: Tensor) -> Tensor:
        """(M, n) HU and (M, n) bool -> (M, embed_dim) feature vectors (see class doc)."""
        weights = valid.to(torch.float64)
        count = weights.sum(-1, keepdim=True)  # (M, 1)
        safe = count.clamp(min=1.0)
        low, high = self.hu_range
        index = ((values - low) * (self.bins / (high - low))).floor().long().clamp(0, self.bins - 1)
        hist = torch.zeros(values.shape[0], self.bins, dtype=torch.float64, device=values.device)
        hist.scatter_add_(1, index, weights)
        v64 = values.to(torch.float64)
        mean = (v64 * weights).sum(-1, keepdim=True) / safe
        var = (((v64 - mean) ** 2) * weights).sum(-1, keepdim=True) / safe
        percentiles = _masked_percentiles(v64, valid, count, PERCENTILES)
        # The classes partition the HU axis, so one bucketize + scatter counts them all.
        boundaries = torch.tensor(
            [lo for _, lo, _ in TISSUE_CLASSES[1:]], dtype=values.dtype, device=values.device
        )
        tissue = torch.bucketize(values, boundaries, right=True)  # class i: [lo_i, hi_i)
        fractions = torch.zeros(
            values.shape[0], len(TISSUE_CLASSES), dtype=torch.float64, device=values.device
        ).scatter_add_(1, tissue, weights)
        features = torch.cat(
            [hist / safe, mean / KHU, var.sqrt() / KHU, percentiles / KHU, fractions / safe],
            dim=-1,
        )
        return torch.where(count > 0, features, torch.zeros_like(features)).to(torch.float32)

    def _extra_description(self) -> dict[str, Any]:
        return {
            "bins": self.bins,
            "hu_range": list(self.hu_range),
            "feature_names": list(self.feature_names),
            "tissue_classes_hu": {name: [lo, hi] for name, lo, hi in TISSUE_CLASSES},
        }


def _masked_percentiles(
    values: Tensor, valid: Tensor, count: Tensor, percentiles: tuple[float, ...]
) -> Tensor:
    """Per-row percentiles of the valid entries, numpy's 'linear' method; (M, len(q))."""
    ordered = torch.where(valid, values, torch.full_like(values, float("inf"))).sort(-1).values
    last = (count - 1).clamp(min=0)  # (M, 1) index of the largest valid value
    position = last * torch.tensor(percentiles, dtype=values.dtype, device=values.device) / 100
    below = position.floor()
    above = position.ceil()
    lo = ordered.gather(1, below.long())
    hi = ordered.gather(1, above.long())
    # Where the two neighbours coincide the weight is 0; avoid inf - inf for empty rows.
    result = lo + torch.where(above > below, (hi - lo) * (position - below), torch.zeros_like(lo))
    return torch.where(count > 0, result, torch.zeros_like(result))


def build_handcrafted(
    config: Mapping[str, Any], device: torch.device, precision: str
) -> HandcraftedExtractor:
    options = backbone_options(
        config, required=(), optional=("name", "bins", "patch_size", "hu_range", "spacing_mm")
    )
    return HandcraftedExtractor(
        bins=int(options.get("bins", 32)),
        patch_size=int(options.get("patch_size", 8)),
        hu_range=tuple(options.get("hu_range", (HU_MIN, HU_MAX))),
        name=options.get("name", "handcrafted"),
        config=config,
        device=device,
        spacing_mm=parse_spacing_mm(options.get("spacing_mm")),
    )
