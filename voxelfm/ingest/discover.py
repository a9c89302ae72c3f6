"""A manifest from a folder of CT: every NIfTI/NRRD/MetaImage file and DICOM series under it.

``voxelfm features`` and :func:`voxelfm.api.features_from_folder` start here when they are
given a folder instead of a manifest. The result is an ordinary manifest (``scan_id``,
``patient_id``, ``image``) that the usual ingestion reads, so nothing about reading or
preprocessing is decided here.

Rules, in the order they apply:

* hidden files and folders (a leading ``.``) are skipped, and so is the ``exclude`` folder
  (the command's own output folder when it lies inside the input);
* a file whose name ends in one of ``voxelfm.io.readers.FILE_FORMATS`` is one scan;
* a folder holding DICOM files (a ``.dcm`` suffix or the ``DICM`` marker) is one scan when
  it holds one series; a folder with several series is skipped with its reason (name them
  in a manifest with ``series_uid``; series UIDs are not copied into outputs);
* ``include`` glob patterns, when given, keep only the scans whose path relative to the
  folder (or whose name) matches one of them, e.g. ``ct.nii.gz`` to leave label maps out.

``scan_id`` is the path relative to the folder without its suffix, with every character
other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``_`` (``pt_1/ct.nii.gz`` ->
``pt_1_ct``); a clash gets ``-2``, ``-3``... ``patient_id`` is the scan id: a folder says
nothing about which scans share a patient (write a manifest when that matters).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from voxelfm.errors import InputError
from voxelfm.io.readers import FILE_FORMATS

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DICOM_MARKER_OFFSET = 128


@dataclass
class FolderScans:
    """What :func:`scan_folder` found: the manifest rows and what it left out, with why."""

    manifest: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def scan_folder(
    folder: str | os.PathLike,
    *,
    include: list[str] | tuple[str, ...] = (),
    exclude: str | os.PathLike | None = None,
) -> FolderScans:
    """Find every CT volume under ``folder`` (recursively); see the module docstring.

    Raises InputError when the folder does not exist or holds no scan.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder")
    excluded = Path(os.path.abspath(exclude)) if exclude is not None else None
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for current, subfolders, names in os.walk(folder):
        here = Path(current)
        subfolders[:] = sorted(
            name
            for name in subfolders
            if not name.startswith(".") and Path(os.path.abspath(here / name)) != excluded
        )
        names = sorted(name for name in names if not name.startswith("."))
        images = [here / name for name in names if _image_format(name)]
        found.extend(images)
        dicom_files = [here / name for name in names if _is_dicom(here / name)]
        if dicom_files:
            reason = _series_problem(here)
            if reason is None:
                found.append(here)
            else:
                skipped.append((str(here), reason))
    rows = []
    taken: set[str] = set()
    for path in found:
        relative = path.relative_to(folder).as_posix()
        if relative == ".":
            relative = folder.resolve().name
        if include and not any(
            fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(path.name, pattern)
            for pattern in include
        ):
            continue
        scan_id = _unique(_scan_id(relative), taken)
        rows.append({"scan_id": scan_id, "patient_id": scan_id, "image": os.path.abspath(path)})
    if not rows:
        detail = f" matching {', '.join(include)}" if include else ""
        why = f"; skipped: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise InputError(
            folder,
            f"holds no CT volume{detail} (NIfTI/NRRD/MHA files or DICOM series folders){why}",
        )
    return FolderScans(pd.DataFrame(rows, columns=["scan_id", "patient_id", "image"]), skipped)


def _image_format(name: str) -> bool:
    lower = name.lower()
    return any(lower.endswith(suffix) for suffix in FILE_FORMATS)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:  # other known suffixes (.txt, .json, .csv...) are not DICOM
        return False
    try:
        with open(path, "rb") as stream:
            return stream.read(_DICOM_MARKER_OFFSET + 4)[_DICOM_MARKER_OFFSET:] == b"DICM"
    except OSError:
        return False


def _series_problem(folder: Path) -> str | None:
    """None when the folder holds exactly one DICOM series, else why it is skipped."""
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        return "holds DICOM files but no readable series"
    if len(series) > 1:
        return (
            f"holds {len(series)} DICOM series; list each in a manifest with series_uid "
            "(voxelfm features accepts a manifest)"
        )
    return None


def _scan_id(relative: str) -> str:
    name = relative
    lower = name.lower()
    for suffix in FILE_FORMATS:  # longest first, so .nii.gz goes as a whole
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    cleaned = _UNSAFE.sub("_", name.replace("/", "_")).strip("._-")
    return (cleaned or "scan")[:120]


def _unique(scan_id: str, taken: set[str]) -> str:
    candidate, n = scan_id, 1
    while candidate in taken:
        n += 1
        candidate = f"{scan_id}-{n}"
    taken.add(candidate)
    return candidate
