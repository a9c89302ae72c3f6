"""Read one CT DICOM series from a folder, checking its slice geometry first.

SimpleITK (GDCM) finds the series and decodes the pixels, applying each file's own
RescaleSlope/Intercept. Its series reader takes slice order and the slice step from the
file list it is given and only prints a warning for uneven spacing; it ignores gantry tilt.
So the geometry comes from the per-slice headers, read here with pydicom:

- slices are sorted by their position along the slice normal (row x column cosines),
  not by InstanceNumber, which scanners number in either direction;
- a gap over ``MISSING_SLICE_GAP_RATIO`` x the median step is a missing slice: refused;
- a slice more than ``SLICE_POSITION_TOLERANCE`` x the step away from the uniform grid
  through the first and last slice is uneven spacing: refused (resampling across an unknown
  number of protocol changes is not a correction we can verify);
- gantry tilt (slices stacked along the table rather than along their normal) is corrected
  exactly: the returned image's third direction is the actual slice-to-slice step, giving a
  sheared (non-orthogonal) direction matrix that ``to_canonical`` resamples away. A warning
  records the tilt angle.

A DICOM file in the folder that GDCM leaves out of the series because it is damaged,
truncated or has no pixel data is reported as what it is (before any geometry check, which
would otherwise see its absence as a missing slice).

Error messages name the folder and slice numbers, and a file by its name only when the name
is not a DICOM UID: scanners often name files by their SOPInstanceUID.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from voxelfm.errors import InputError
from voxelfm.io.geometry import DEFAULT_LIMITS, GeometryLimits
from voxelfm.io.sitk_errors import itk_error_reason

MISSING_SLICE_GAP_RATIO = 1.5
SLICE_POSITION_TOLERANCE = 0.1  # fraction of the slice step
GANTRY_TILT_MIN_DEG = 0.01  # below this the step is taken as along the normal (rounding)

_HEADER_TAGS = [
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
]


@dataclass(frozen=True)
class DicomSeries:
    """A read series: HU image (float32, LPS), its files in slice order, reader warnings."""

    image: sitk.Image
    files: list[Path]
    warnings: list[str]


def read_dicom_series(
    folder: Path, series_uid: str | None = None, limits: GeometryLimits = DEFAULT_LIMITS
) -> DicomSeries:
    """Read the CT series in ``folder`` (or the one with ``series_uid``) as float32 HU;
    a geometry outside ``limits`` is refused before the pixels are decoded."""
    files = _series_files(folder, series_uid)
    _check_left_out_files(folder, files)
    headers = [_read_header(folder, f, k, len(files)) for k, f in enumerate(files)]
    _check_modality(folder, headers)
    _check_consistent_slices(folder, headers)
    order, direction, spacing, warnings = _slice_geometry(folder, headers)
    files = [files[k] for k in order]
    first = headers[order[0]]
    limits.check(folder, (int(first.Columns), int(first.Rows), len(files)), spacing)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(folder, f"SimpleITK cannot read the series: {itk_error_reason(error)}")
    expected_size = (int(first.Columns), int(first.Rows), len(files))
    if image.GetSize() != expected_size:
        raise InputError(
            folder, f"decoded size {image.GetSize()} differs from the headers' {expected_size}"
        )
    image.SetOrigin([float(v) for v in first.ImagePositionPatient])
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    return DicomSeries(image=image, files=files, warnings=warnings)


# A series UID is an identifier: manifests derived by this tool carry this pseudonymous
# reference to it instead, which still picks the series in its folder.
SERIES_REFERENCE_PREFIX = "sha256:"


def series_reference(series_uid: str) -> str:
    """The pseudonymous reference of a SeriesInstanceUID ("sha256:<hex>"), kept as is when
    it already is one."""
    if series_uid.startswith(SERIES_REFERENCE_PREFIX):
        return series_uid
    return SERIES_REFERENCE_PREFIX + hashlib.sha256(series_uid.strip().encode()).hexdigest()


def _series_files(folder: Path, series_uid: str | None) -> list[Path]:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(folder, "holds no DICOM series (no readable DICOM files found)")
    if series_uid is None and len(series_ids) > 1:
        counts = sorted(
            len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            for uid in series_ids
        )
        raise InputError(
            folder,
            f"holds {len(series_ids)} DICOM series (with {', '.join(map(str, counts))} files); "
            "point at a folder holding one series or pass series_uid",
        )
    if series_uid is not None:
        wanted = series_reference(series_uid)
        matching = [uid for uid in series_ids if series_reference(uid) == wanted]
        if not matching:
            raise InputError(
                folder, f"has no series with the given series_uid (it holds {len(series_ids)})"
            )
        series_uid = matching[0]
    uid = series_uid or series_ids[0]
    return [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]


_UID_LIKE_NAME = re.compile(r"[0-9]+(\.[0-9]+){3,}(\.dcm)?", re.IGNORECASE)


def _check_left_out_files(folder: Path, series_files: list[Path]) -> None:
    """Refuse when a DICOM file of the folder was left out of the series for being damaged,
    truncated or without pixel data; files of other series and non-DICOM files are ignored."""
    in_series = {f.resolve() for f in series_files}
    candidates = sorted(p for p in folder.iterdir() if p.is_file())
    if len(candidates) == len(series_files):
        return
    series_uid = _series_uid_of(series_files[0])
    for position, file in enumerate(candidates, start=1):
        if file.resolve() in in_series or not _looks_like_dicom(file):
            continue
        label = _file_label(file, position, len(candidates))
        try:
            dataset = pydicom.dcmread(file, defer_size="1 KB")
            if series_uid and dataset.get("SeriesInstanceUID") not in (None, series_uid):
                continue  # another series' file
            if "Rows" not in dataset or "Columns" not in dataset:
                raise InputError(
                    folder,
                    f"slice file {label} is truncated or damaged: its header ends before "
                    "the image attributes",
                )
            if "PixelData" not in dataset:
                raise InputError(folder, f"slice file {label} has no pixel data")
            expected = int(dataset.Rows) * int(dataset.Columns) * int(dataset.BitsAllocated) // 8
            found = len(dataset.PixelData)
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 -- pydicom raises many types on bad bytes
            raise InputError(
                folder,
                f"slice file {label} is truncated or damaged ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:120]})",
            ) from None
        if found < expected:
            raise InputError(
                folder,
                f"slice file {label} is truncated: {found} of {expected} bytes of pixel data",
            )


def _looks_like_dicom(file: Path) -> bool:
    with open(file, "rb") as stream:
        return stream.read(132)[128:] == b"DICM"


def _series_uid_of(file: Path) -> str | None:
    try:
        uid = pydicom.dcmread(file, stop_before_pixels=True).get("SeriesInstanceUID")
    except Exception:  # noqa: BLE001 -- the series reader reports unreadable series files
        return None
    return None if uid is None else str(uid)


def _file_label(file: Path, position: int, count: int) -> str:
    """A file's name, or its position when the name is a UID (an identifier)."""
    if _UID_LIKE_NAME.fullmatch(file.name):
        return f"#{position} of {count} (by name)"
    return repr(file.name)


def _read_header(folder: Path, file: Path, k: int, n: int) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(file, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, struct.error) as error:
        raise InputError(folder, f"file {k + 1} of {n} has an unreadable header: {error}")


def _check_modality(folder: Path, headers: list[pydicom.Dataset]) -> None:
    modalities = {str(h.get("Modality", "")) for h in headers}
    if modalities != {"CT"}:
        found = ", ".join(sorted(m or "missing" for m in modalities))
        raise InputError(folder, f"modality is {found}; only CT series are supported")
    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
        raise InputError(
            folder,
            "holds multi-frame (enhanced) DICOM, which is not supported; "
            "convert it to NIfTI first (e.g. with dcm2niix)",
        )


def _check_consistent_slices(folder: Path, headers: list[pydicom.Dataset]) -> None:
    if len(headers) < 2:
        raise InputError(folder, f"series has {len(headers)} slice; a 3D volume needs at least 2")
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        missing = sum(tag not in h for h in headers)
        if missing:
            raise InputError(folder, f"{missing} of {len(headers)} slices lack {tag}")
    for tag, atol in (("ImageOrientationPatient", 1e-4), ("PixelSpacing", 1e-4)):
        values = np.array([[float(v) for v in h[tag].value] for h in headers])
        if np.abs(values - values[0]).max() > atol:
            raise InputError(folder, f"slices differ in {tag}; they do not form one volume")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise InputError(folder, f"slices differ in size: {sorted(sizes)}")


def _slice_geometry(
    folder: Path, headers: list[pydicom.Dataset]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], list[str]]:
    """Slice order, 3x3 LPS direction (columns: i, j, k steps), spacing, warnings."""
    orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3)
    # Decimal strings carry ~6 digits; renormalise so the direction matrix is orthonormal.
    row_cosines, column_cosines = orientation / np.linalg.norm(orientation, axis=1, keepdims=True)
    normal = np.cross(row_cosines, column_cosines)
    normal /= np.linalg.norm(normal)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])  # (N, 3)
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    positions, along_normal = positions[order], along_normal[order]
    n = len(positions)

    gaps = np.diff(along_normal)
    median_gap = float(np.median(gaps))
    if gaps.min() < 1e-3:
        raise InputError(
            folder,
            "two slices share a position (duplicate slices, or several phases in one "
            "series); point at a single-phase series",
        )
    widest = int(np.argmax(gaps))
    if gaps[widest] > MISSING_SLICE_GAP_RATIO * median_gap:
        raise InputError(
            folder,
            f"missing slice: gap of {gaps[widest]:.2f} mm after slice {widest + 1} of {n} "
            f"where the slice spacing is {median_gap:.2f} mm",
        )

    step = (positions[-1] - positions[0]) / (n - 1)  # (3,) mm, LPS
    step_length = float(np.linalg.norm(step))
    uniform = positions[0] + np.arange(n)[:, None] * step
    deviation = np.linalg.norm(positions - uniform, axis=1)
    worst = int(np.argmax(deviation))
    if deviation[worst] > SLICE_POSITION_TOLERANCE * step_length:
        raise InputError(
            folder,
            f"uneven slice spacing: slice {worst + 1} of {n} is {deviation[worst]:.2f} mm from "
            f"a uniform {step_length:.2f} mm grid (tolerance "
            f"{SLICE_POSITION_TOLERANCE:.0%} of the spacing)",
        )

    warnings = []
    tilt_deg = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / step_length, 0, 1))))
    if tilt_deg > GANTRY_TILT_MIN_DEG:
        slice_axis = step / step_length  # sheared: not orthogonal to the slice plane
        warnings.append(
            f"gantry tilt of {tilt_deg:.2f} degrees: slice positions kept exactly "
            "(sheared grid), resampling to the canonical grid removes the shear"
        )
    else:
        slice_axis = normal
        step_length = abs(float(step @ normal))
    pixel_spacing = [float(v) for v in headers[0].PixelSpacing]  # (between rows, between columns)
    spacing = (pixel_spacing[1], pixel_spacing[0], step_length)
    direction = np.stack([row_cosines, column_cosines, slice_axis], axis=1)
    return order, direction, spacing, warnings
