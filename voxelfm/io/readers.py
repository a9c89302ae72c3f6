"""Read a CT volume from a DICOM series folder, NIfTI, NRRD or MetaImage file.

``read_image`` is the single entry point: it returns the volume as float32 HU in ITK's LPS
world (any direction matrix; the canonical RAS grid is ``voxelfm.io.canonical``'s job) plus
non-identifying metadata. Every rescale is the file's own: SimpleITK applies DICOM
RescaleSlope/Intercept and NIfTI scl_slope/scl_inter when it decodes, so nothing here adds
an offset (doing so would double-apply it). Anything that would give silently wrong voxels
is refused with an ``InputError`` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

from voxelfm.errors import InputError
from voxelfm.io.dicom_series import read_dicom_series
from voxelfm.io.geometry import DEFAULT_LIMITS, GeometryLimits, axcodes
from voxelfm.io.sitk_errors import itk_error_reason

# Longest suffix first so ".nii.gz" wins over ".gz".
FILE_FORMATS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_BYTES = 1 << 20


def read_image(
    path: str | os.PathLike,
    series_uid: str | None = None,
    limits: GeometryLimits = DEFAULT_LIMITS,
) -> tuple[sitk.Image, dict[str, Any]]:
    """Read a 3D volume as float32 (HU for CT) in ITK's LPS world.

    path: a folder holding one DICOM series (or several, with ``series_uid`` choosing one:
    the SeriesInstanceUID or its pseudonymous ``dicom_series.series_reference``),
    or a .nii / .nii.gz / .nrrd / .nhdr / .mha / .mhd file. A 4D file is accepted only when
    it holds a single volume.

    Returns (image, meta) where meta holds source_format ("dicom", "nifti", "nrrd",
    "metaimage"), source_sha256 (of the file, or of the series' files in slice order),
    original_shape and original_spacing (in file index order i, j, k), original_axcodes
    (e.g. "PLI") and warnings (list of str). Raises InputError for anything unreadable,
    and for a voxel size or voxel count outside ``limits`` (checked from the header, before
    the voxels are read).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        series = read_dicom_series(path, series_uid, limits)
        image, files, warnings, source_format = series.image, series.files, series.warnings, "dicom"
    else:
        if series_uid is not None:
            raise InputError(path, "series_uid applies only to a DICOM series folder")
        source_format = _file_format(path)
        image, warnings = _read_file(path, source_format, limits)
        files = [path]
    _check_finite(path, image)
    meta = {
        "source_format": source_format,
        "source_sha256": sha256_of_files(files),
        "original_shape": list(image.GetSize()),
        "original_spacing": [float(s) for s in image.GetSpacing()],
        "original_axcodes": axcodes(image),
        "warnings": warnings,
    }
    return image, meta


def sha256_of_files(files: Iterable[Path]) -> str:
    """SHA-256 of the files' bytes concatenated in the given order."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as stream:
            while chunk := stream.read(_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix, source_format in FILE_FORMATS.items():
        if name.endswith(suffix):
            return source_format
    if _is_dicom_file(path):
        raise InputError(path, "is a single DICOM file; pass the folder holding its series")
    raise InputError(
        path,
        f"unsupported file type; expected a DICOM series folder or one of {', '.join(FILE_FORMATS)}",
    )


def _is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(132)[128:] == b"DICM"


def _read_file(
    path: Path, source_format: str, limits: GeometryLimits
) -> tuple[sitk.Image, list[str]]:
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    warnings = _check_nifti(path, limits) if source_format == "nifti" else []
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _select_3d_volume(path, reader)
        limits.check(path, reader.GetSize()[:3], reader.GetSpacing()[:3])
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            path,
            f"cannot be read as {source_format} (damaged or truncated?): {itk_error_reason(error)}",
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path,
            f"has {image.GetNumberOfComponentsPerPixel()} values per voxel; "
            "a scalar (grey-level) volume is needed",
        )
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image, warnings


def _select_3d_volume(path: Path, reader: sitk.ImageFileReader) -> None:
    """Refuse 2D files and 4D files with several volumes; collapse a single-volume 4D file."""
    size = reader.GetSize()
    if len(size) == 4 and size[3] == 1:
        reader.SetExtractSize([*size[:3], 0])  # 0 drops the axis
        size = size[:3]
    if len(size) == 4:
        raise InputError(
            path, f"is 4D with {size[3]} volumes (size {size}); pass a single 3D volume"
        )
    if len(size) != 3 or min(size) < 2:
        raise InputError(path, f"is not a 3D volume (size {tuple(size)}); a CT volume is needed")


def _check_nifti(path: Path, limits: GeometryLimits) -> list[str]:
    """Refuse a NIfTI whose header geometry is implausible or whose voxel data is cut short
    or holds NaN/inf; return warnings (qform and sform that disagree).

    SimpleITK silently reads a zero voxel size as 1 mm and a negative one as a flipped axis,
    so the raw pixdim is checked here. It also zero-fills a truncated .nii or .nii.gz and
    reads NaN and inf as 0, so one streaming pass over the voxel bytes checks both (for .gz,
    gzip's own CRC and length check also catch damaged data). Memory stays at one chunk.
    """
    try:
        nifti = nib.load(path)  # reads only the header
    except (ImageFileError, OSError, EOFError, ValueError) as error:
        raise InputError(path, f"is not a readable NIfTI file: {error}")
    with open(path, "rb") as stream:
        compressed = stream.read(2) == _GZIP_MAGIC
    opener = gzip.open if compressed else open
    try:  # nibabel's loaded header has pixdim already "repaired"; read it as written
        with opener(path, "rb") as stream:
            raw_header = type(nifti.header).from_fileobj(stream, check=False)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise InputError(path, f"is not a readable NIfTI file: {error}")
    warnings = _check_nifti_geometry(path, raw_header, limits)
    proxy = nifti.dataobj
    dtype = np.dtype(proxy.dtype)
    expected_bytes = int(np.prod(proxy.shape)) * dtype.itemsize
    check_finite = dtype.kind in "fc"
    seen_bytes, non_finite, carry = 0, 0, b""
    try:
        with opener(path, "rb") as stream:
            stream.seek(int(proxy.offset))
            while seen_bytes < expected_bytes and (chunk := stream.read(_CHUNK_BYTES)):
                chunk = chunk[: expected_bytes - seen_bytes]
                seen_bytes += len(chunk)
                if check_finite:
                    chunk = carry + chunk  # keep voxels whole across chunk boundaries
                    whole = len(chunk) - len(chunk) % dtype.itemsize
                    values = np.frombuffer(chunk[:whole], dtype=dtype)
                    non_finite += values.size - int(np.count_nonzero(np.isfinite(values)))
                    carry = chunk[whole:]
            if compressed:
                stream.read()  # to the end, so gzip verifies its CRC and length
    except EOFError:
        raise InputError(path, "truncated gzip stream (the file was cut short)")
    except (gzip.BadGzipFile, zlib.error, OSError) as error:
        raise InputError(path, f"damaged gzip data: {error}")
    if seen_bytes < expected_bytes:
        raise InputError(
            path, f"truncated: holds {seen_bytes} of the {expected_bytes} bytes of voxel data"
        )
    if non_finite:
        raise InputError(path, f"holds {non_finite} NaN or infinite voxels")
    return warnings


_QFORM_SFORM_TOLERANCE_MM = 1e-3


def _check_nifti_geometry(path: Path, header: Any, limits: GeometryLimits) -> list[str]:
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) < 3:
        return []  # refused as "not a 3D volume" by the common check
    pixdim = [float(v) for v in header["pixdim"][1:4]]
    if not all(np.isfinite(pixdim)) or min(pixdim) <= 0:
        raise InputError(
            path,
            f"header voxel size (pixdim) {'x'.join(f'{v:.4g}' for v in pixdim)} mm is zero or "
            "negative; the scan's geometry cannot be trusted",
        )
    limits.check(path, shape[:3], pixdim)
    if int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0:
        disagreement = float(np.abs(header.get_qform() - header.get_sform()).max())
        if disagreement > _QFORM_SFORM_TOLERANCE_MM:
            return [
                (
                    f"qform and sform disagree (by up to {disagreement:.3g} mm): the position "
                    "or orientation read may not be the one meant; check the converter"
                )
            ]
    return []


def _check_finite(path: Path, image: sitk.Image) -> None:
    voxels = sitk.GetArrayViewFromImage(image)
    bad = voxels.size - int(np.count_nonzero(np.isfinite(voxels)))
    if bad:
        raise InputError(path, f"holds {bad} NaN or infinite voxels")
