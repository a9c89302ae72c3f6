"""Read and validate a scan manifest (CSV or TSV).

Required columns: ``scan_id``, ``patient_id``, ``image`` (a DICOM series folder or a
NIfTI/NRRD/MetaImage file). Optional: ``label_<name>`` columns holding label-map paths
(an empty cell means that scan has no such label), ``series_uid`` (picks one series in a
DICOM folder holding several; a UID is an identifier, so the validated manifest holds its
pseudonymous ``sha256:`` reference instead, which picks the same series) and ``rescale_slope`` / ``rescale_intercept`` (HU = slope x
stored value + intercept, applied before anything else, for collections whose image files
hold raw stored values with the rescale in a side table, such as CT-RATE; an empty cell
means the file's values are already HU). Other columns are kept and ignored. Relative paths are
resolved against the manifest's folder.

Every problem is an InputError naming the manifest and the line (the header is line 1), so
a user can fix the file without reading code. A missing image file is not a manifest error
(it is recorded as that scan's failure, so one bad row does not stop a shard) unless
``strict`` is set.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pandas as pd

from voxelfm.errors import InputError
from voxelfm.store.layout import SAFE_NAME_RULE, is_safe_name

REQUIRED_COLUMNS = ("scan_id", "patient_id", "image")
LABEL_PREFIX = "label_"
SERIES_UID_COLUMN = "series_uid"
RESCALE_COLUMNS = ("rescale_slope", "rescale_intercept")
_FIRST_DATA_LINE = 2  # line 1 is the header


def label_columns(manifest: pd.DataFrame) -> dict[str, str]:
    """Label name -> column, for every ``label_<name>`` column."""
    return {c[len(LABEL_PREFIX) :]: c for c in manifest.columns if c.startswith(LABEL_PREFIX)}


def label_paths(row: pd.Series) -> dict[str, str]:
    """Label name -> path for the labels this row has (non-empty cells)."""
    return {
        column[len(LABEL_PREFIX) :]: row[column]
        for column in row.index
        if column.startswith(LABEL_PREFIX) and row[column]
    }


def rescale_of(row: pd.Series) -> tuple[float, float] | None:
    """(slope, intercept) a manifest row asks for, or None (the file's values are HU)."""
    slope, intercept = (str(row.get(column) or "").strip() for column in RESCALE_COLUMNS)
    if not slope and not intercept:
        return None
    return float(slope or 1.0), float(intercept or 0.0)


def read_manifest(
    path: str | os.PathLike, *, strict: bool = False, allow_empty: bool = False
) -> pd.DataFrame:
    """The validated manifest as strings, with absolute ``image`` and ``label_*`` paths.

    strict: also require every image and label file to exist.
    allow_empty: accept a manifest without rows (a shard that received no scans).
    """
    path = Path(path)
    manifest = _read_table(path)
    _check_columns(path, manifest)
    if manifest.empty and not allow_empty:
        raise InputError(path, "has no scans (only a header)")
    _check_cells(path, manifest)
    _check_unique_scans(path, manifest)
    if SERIES_UID_COLUMN in manifest.columns:
        from voxelfm.io.dicom_series import series_reference

        manifest[SERIES_UID_COLUMN] = [
            series_reference(uid) if uid else uid for uid in manifest[SERIES_UID_COLUMN]
        ]
    for column in ("image", *label_columns(manifest).values()):
        manifest[column] = [_resolve(path.parent, value) for value in manifest[column]]
    if strict:
        _check_files_exist(path, manifest)
    return manifest


def _read_table(path: Path) -> pd.DataFrame:
    # The csv module rather than pandas.read_csv: pandas silently turns extra fields into an
    # index or drops them, where a manifest error must name the line.
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:  # -sig: Excel's BOM
            text = stream.read()
    except FileNotFoundError:
        raise InputError(path, "manifest does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read manifest: {error}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InputError(path, "manifest is empty; expected a header with " + _required_text())
    delimiter = "\t" if "\t" in lines[0] else ","
    try:
        rows = list(csv.reader(lines, delimiter=delimiter, strict=True))
    except csv.Error as error:
        raise InputError(path, f"cannot parse manifest: {error}") from None
    header = [name.strip() for name in rows[0]]
    records = []
    for line, row in enumerate(rows[1:], start=_FIRST_DATA_LINE):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise InputError(path, f"line {line}: {len(row)} fields, the header has {len(header)}")
        records.append([cell.strip() for cell in row])
    # Everything stays text: ids keep leading zeros and "NA" is a name, not a missing value.
    return pd.DataFrame(records, columns=header, dtype=str)


def _required_text() -> str:
    return ", ".join(REQUIRED_COLUMNS)


def _check_columns(path: Path, manifest: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise InputError(
            path,
            f"missing required column(s) {', '.join(missing)}; found "
            f"{', '.join(manifest.columns) or 'none'} (columns must be separated by commas or tabs)",
        )
    duplicated = sorted({c for c in manifest.columns if list(manifest.columns).count(c) > 1})
    if duplicated:
        raise InputError(path, f"column(s) {', '.join(duplicated)} appear more than once")
    for name, column in label_columns(manifest).items():
        if not is_safe_name(name):
            raise InputError(path, f"column {column!r}: label name {name!r} {SAFE_NAME_RULE}")


def _check_cells(path: Path, manifest: pd.DataFrame) -> None:
    for column in REQUIRED_COLUMNS:
        empty = (manifest[column] == "").to_numpy().nonzero()[0]
        if len(empty):
            raise InputError(path, f"line {empty[0] + _FIRST_DATA_LINE}: empty {column!r}")
    for position, scan_id in enumerate(manifest["scan_id"]):
        if not is_safe_name(scan_id):
            line = position + _FIRST_DATA_LINE
            raise InputError(path, f"line {line}: scan_id {scan_id!r} {SAFE_NAME_RULE}")
    for column in RESCALE_COLUMNS:
        if column not in manifest.columns:
            continue
        for position, value in enumerate(manifest[column]):
            try:
                number = float(value) if value else 0.0
            except ValueError:
                number = float("nan")
            if not np.isfinite(number) or (column == "rescale_slope" and value and number == 0):
                line = position + _FIRST_DATA_LINE
                raise InputError(path, f"line {line}: {column} {value!r} is not a usable number")


def _check_unique_scans(path: Path, manifest: pd.DataFrame) -> None:
    first_line: dict[str, int] = {}
    for position, (scan_id, patient_id) in enumerate(
        zip(manifest["scan_id"], manifest["patient_id"])
    ):
        line = position + _FIRST_DATA_LINE
        if scan_id not in first_line:
            first_line[scan_id] = line
            continue
        earlier = first_line[scan_id]
        earlier_patient = manifest["patient_id"].iloc[earlier - _FIRST_DATA_LINE]
        if earlier_patient != patient_id:
            raise InputError(
                path,
                f"scan_id {scan_id!r} is given to two patients: {earlier_patient!r} on line "
                f"{earlier} and {patient_id!r} on line {line}",
            )
        raise InputError(path, f"duplicate scan_id {scan_id!r} on lines {earlier} and {line}")


def _resolve(folder: Path, value: str) -> str:
    if not value:
        return value  # an empty label cell: this scan has no such label
    # abspath, not resolve(): keep the user's symlinks in the recorded paths.
    return os.path.abspath(folder / Path(value).expanduser())


def _check_files_exist(path: Path, manifest: pd.DataFrame) -> None:
    for column in ("image", *label_columns(manifest).values()):
        for position, value in enumerate(manifest[column]):
            if value and not Path(value).exists():
                line = position + _FIRST_DATA_LINE
                raise InputError(path, f"line {line}: {column} {value} does not exist")


def check_label_table(labels: str | os.PathLike, manifest: pd.DataFrame) -> None:
    """Refuse a label table that would leak or mislabel, before any scan is processed.

    ``labels``: the label CSV, or a folder holding labels.csv. Each scan it shares with the
    manifest must belong to the same patient there, and when it has a ``split`` column no
    patient may have scans in two splits (a patient in train and test inflates every
    metric). Raises InputError naming the table.
    """
    from voxelfm.label_table import read_label_table
    from voxelfm.splits import PatientLeakageError, check_patient_level_split

    path = Path(labels)
    if path.is_dir():
        path = path / "labels.csv"
    table = read_label_table(path)
    table["patient_id"] = table["patient_id"].astype(str)
    shared = table[["scan_id", "patient_id"]].merge(
        manifest[["scan_id", "patient_id"]], on="scan_id", suffixes=("", "_manifest")
    )
    disagree = shared[shared["patient_id"] != shared["patient_id_manifest"]]
    if len(disagree):
        first = disagree.iloc[0]
        raise InputError(
            path,
            f"{len(disagree)} scan(s) belong to another patient than in the manifest, e.g. "
            f"scan {first['scan_id']!r}: patient {first['patient_id']!r} here, "
            f"{first['patient_id_manifest']!r} in the manifest",
        )
    if "split" in table.columns:
        assigned = table[table["split"].notna()]
        try:
            check_patient_level_split(
                assigned["patient_id"].to_numpy(), assigned["split"].astype(str).to_numpy()
            )
        except PatientLeakageError as error:
            raise InputError(path, f"{error} (patient-level leakage)") from None
