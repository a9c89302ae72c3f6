"""Per-scan quality numbers, computed once at ingestion and kept with the scan.

They answer "did this scan come out right?" without opening it: geometry before and after
canonicalisation, HU distribution (a scan with p50 near -1000 is mostly air or padding; one
with p1 above -900 has no air, so its values are probably not HU), the fraction of voxels
at the lower clip (air outside the body plus padding outside the field of view), and how
many voxels each label covers.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from voxelfm.conventions import HU_MIN
from voxelfm.volume import CanonicalVolume

HU_PERCENTILES = (1, 5, 50, 95, 99)


def scan_qc(volume: CanonicalVolume) -> dict[str, Any]:
    """QC numbers of one preprocessed scan (flat, CSV-ready)."""
    meta = volume.meta
    hu_low = (meta.get("hu_range") or [HU_MIN])[0]
    image = volume.image
    # Percentiles of every 2nd voxel along each axis: within ~1 HU of the exact values on CT
    # and 10x cheaper than partitioning the whole volume.
    sample = image[::2, ::2, ::2]
    percentiles = np.percentile(sample, HU_PERCENTILES) if sample.size else [np.nan] * 5
    row: dict[str, Any] = {
        "shape": _as_text(image.shape),
        "spacing": _as_text(volume.spacing),
        "original_shape": _as_text(meta.get("original_shape")),
        "original_spacing": _as_text(meta.get("original_spacing")),
        "original_axcodes": meta.get("original_axcodes", ""),
        "source_format": meta.get("source_format", ""),
        **{f"hu_p{q}": float(v) for q, v in zip(HU_PERCENTILES, percentiles)},
        "frac_at_hu_min": float(np.mean(image <= hu_low)) if image.size else float("nan"),
    }
    for name, label in sorted(volume.labels.items()):
        row[f"label_{name}_voxels"] = int(np.count_nonzero(label))
    warnings = list(meta.get("warnings") or [])
    row["n_warnings"] = len(warnings)
    row["warnings"] = " | ".join(" ".join(str(w).split()) for w in warnings)
    return row


def _as_text(values: Any) -> str:
    """(240, 240, 180) -> '240x240x180'; floats to 4 significant digits (0.9766)."""
    if values is None:
        return ""
    if isinstance(values, str):
        return values
    return "x".join(
        str(int(v)) if isinstance(v, numbers.Integral) else f"{float(v):.4g}" for v in values
    )
