"""The label table: one row per scan, with at least ``scan_id`` and ``patient_id``.

Read by ingestion (to refuse a table that leaks or mislabels before any scan is processed)
and by evaluation (to align labels with embeddings), so it lives in the base layer.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from voxelfm.errors import InputError


def read_label_table(path) -> pd.DataFrame:
    """The label table (CSV, one row per scan with at least ``scan_id`` and ``patient_id``).

    A folder means its ``labels.csv``, as written by the synthetic cohort generator.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "labels.csv"
    try:
        table = pd.read_csv(path, dtype={"scan_id": str, "patient_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InputError(path, f"cannot read the label table: {error}") from None
    missing = {"scan_id", "patient_id"} - set(table.columns)
    if missing:
        raise InputError(path, f"label table lacks column(s) {sorted(missing)}")
    duplicated = table["scan_id"][table["scan_id"].duplicated()]
    if len(duplicated):
        raise InputError(path, f"scan_id repeated in the label table: {duplicated.iloc[0]!r}")
    return table
