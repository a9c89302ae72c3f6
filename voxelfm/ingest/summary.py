"""Merge the shards' reports into one summary a user can check at a glance.

Outputs in ``out_dir``: ``qc.csv`` and ``failures.csv`` (all shards), ``summary.json``
(counts, failures by reason, consistency between reports and stores, identical images filed
under different patients) and ``mosaic.png``.

The mosaic shows, for up to ``mosaic_scans`` scans, the middle axial slice in a
soft-tissue window (W400/L40: fat dark grey, muscle and organs mid grey, bone white) and
the middle coronal slice in a lung window (W1500/L-600: lungs and airways visible). Both
use the radiological convention: the patient's right on the image's left, anterior (axial)
and superior (coronal) up. A scan flipped left-right, upside down or with HU off by 1024
stands out against its neighbours.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from voxelfm.ingest.shards import FAILURE_COLUMNS, QC_ID_COLUMNS
from voxelfm.store.reader import VolumeStore
from voxelfm.utils.atomic import atomic_write_bytes, atomic_write_text, write_csv_atomically

SOFT_TISSUE_WINDOW = (40, 400)  # (level, width) HU
LUNG_WINDOW = (-600, 1500)
MOSAIC_COLUMNS = 4  # scans per mosaic row
PANEL_INCHES = 2.0
TITLE_INCHES = 0.3  # per mosaic row, for the scan id
HEADER_INCHES = 0.5  # once, for the legend line
MOSAIC_DPI = 100


def summarize(
    store_paths: Sequence[str | os.PathLike],
    qc_csvs: Sequence[str | os.PathLike],
    failure_csvs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    mosaic_scans: int = 16,
) -> dict[str, Any]:
    """Write qc.csv, failures.csv, summary.json and mosaic.png; return the summary."""
    out_dir = Path(out_dir)
    qc = _concat(qc_csvs, QC_ID_COLUMNS)
    failures = _concat(failure_csvs, FAILURE_COLUMNS)
    store = VolumeStore(list(store_paths)) if store_paths else None
    stored = set(store.scan_ids) if store is not None else set()
    reported = set(qc["scan_id"])
    mosaic_ids = sorted(stored)[:mosaic_scans]
    summary = {
        "scans_ok": len(qc),
        "scans_failed": len(failures),
        "patients_ok": int(qc["patient_id"].nunique()),
        "failures_by_reason": _counts(failures["reason"]),
        "failures_by_error_type": _counts(failures["error_type"]),
        "scans_with_warnings": int((qc.get("n_warnings", pd.Series(dtype=int)) > 0).sum()),
        "shards": len(store_paths),
        # Both lists are empty unless a report and its store disagree (e.g. a hand edit).
        "in_qc_but_not_stored": sorted(reported - stored),
        "stored_but_not_in_qc": sorted(stored - reported),
        "mosaic_scans": mosaic_ids,
        "identical_images_across_patients": identical_images_across_patients(store),
    }
    for group in summary["identical_images_across_patients"]:
        print(
            f"warning: identical images filed under {len(group['patient_ids'])} patients "
            f"(scans {', '.join(group['scan_ids'])}): a duplicate export or a mix-up; "
            "such scans can leak across splits",
            file=sys.stderr,
        )
    write_csv_atomically(qc, out_dir / "qc.csv")
    write_csv_atomically(failures, out_dir / "failures.csv")
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    png = mosaic_png(store, mosaic_ids)
    atomic_write_bytes(out_dir / "mosaic.png", png)
    return summary


def identical_images_across_patients(store: VolumeStore | None) -> list[dict[str, Any]]:
    """Groups of stored scans whose source images are byte-identical (same content
    fingerprint, ``source_sha256``) but filed under more than one patient."""
    if store is None:
        return []
    by_content: dict[str, list[str]] = {}
    for scan_id in store.scan_ids:
        fingerprint = store.attrs(scan_id).get("source_sha256")
        if fingerprint:
            by_content.setdefault(fingerprint, []).append(scan_id)
    groups = []
    for scan_ids in by_content.values():
        patients = sorted({store.patient_id(s) for s in scan_ids})
        if len(patients) > 1:
            groups.append({"scan_ids": sorted(scan_ids), "patient_ids": patients})
    return sorted(groups, key=lambda group: group["scan_ids"])


def mosaic_png(store: VolumeStore | None, scan_ids: Sequence[str]) -> bytes:
    """PNG bytes of the mid-slice mosaic (see the module docstring)."""
    columns = max(1, min(MOSAIC_COLUMNS, len(scan_ids)))
    rows = max(1, math.ceil(len(scan_ids) / columns))
    row_inches = PANEL_INCHES + TITLE_INCHES
    figure = Figure(
        figsize=(columns * 2 * PANEL_INCHES, rows * row_inches + HEADER_INCHES), dpi=MOSAIC_DPI
    )
    figure.patch.set_facecolor("black")
    figure.text(
        0.5,
        1 - 0.5 * HEADER_INCHES / figure.get_figheight(),
        "axial W400/L40 | coronal W1500/L-600 -- patient's right on image left, "
        "anterior / superior up"
        if scan_ids
        else "no scans stored",
        color="white",
        ha="center",
        va="center",
        fontsize=9,
    )
    top = 1 - HEADER_INCHES / figure.get_figheight()
    height = row_inches / figure.get_figheight()
    for position, scan_id in enumerate(scan_ids):
        row, column = divmod(position, columns)
        image = store.read_volume(scan_id)
        spacing = store.attrs(scan_id)["spacing"]
        panels = (
            (image[:, :, image.shape[2] // 2], spacing[1] / spacing[0], SOFT_TISSUE_WINDOW),
            (image[:, image.shape[1] // 2, :], spacing[2] / spacing[0], LUNG_WINDOW),
        )
        for panel, (plane, aspect, (level, width)) in enumerate(panels):
            left = (2 * column + panel) / (2 * columns)
            bottom = top - (row + 1) * height
            axes = figure.add_axes(
                (left, bottom, 1 / (2 * columns), height * PANEL_INCHES / row_inches)
            )
            axes.imshow(
                radiological_view(plane),
                cmap="gray",
                vmin=level - width / 2,
                vmax=level + width / 2,
                aspect=aspect,
                interpolation="nearest",
            )
            axes.set_axis_off()
            if panel == 0:
                axes.text(
                    0.0,
                    1.02,
                    scan_id,
                    color="white",
                    fontsize=8,
                    transform=axes.transAxes,
                    va="bottom",
                    clip_on=False,
                )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=MOSAIC_DPI, facecolor="black")
    return buffer.getvalue()


def radiological_view(plane: np.ndarray) -> np.ndarray:
    """A canonical (R, A, S) plane as displayed radiologically.

    ``plane`` is an axial (X, Y) or coronal (X, Z) slice; array axis 0 points to the
    patient's right, axis 1 anterior (or superior). Displayed rows run from anterior
    (superior) at the top, columns from the patient's right at the left.
    """
    return plane.T[::-1, ::-1]


def _concat(paths: Sequence[str | os.PathLike], id_columns: list[str]) -> pd.DataFrame:
    # Only empty cells are missing: a patient called "NA" stays a string.
    tables = [
        pd.read_csv(p, dtype={c: str for c in id_columns}, keep_default_na=False, na_values=[""])
        for p in paths
    ]
    tables = [t for t in tables if not t.empty]
    if not tables:
        return pd.DataFrame(columns=id_columns)
    return pd.concat(tables, ignore_index=True).sort_values("scan_id", kind="stable")


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().sort_index().items()}
