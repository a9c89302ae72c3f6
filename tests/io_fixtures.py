"""Builders of small synthetic CT inputs, good and bad, in a given folder.

Each ``make_*`` takes a folder (e.g. pytest's ``tmp_path``) and returns the path to pass to
a reader. ``BAD_INPUTS`` maps a case name to (builder, words the InputError reason must
contain), so ingestion tests can reuse the same broken inputs at shard level.
"""

from __future__ import annotations

import gzip
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from voxelfm.io.dicom_write import write_dicom_series

AIR_HU = -1000.0
MARKER_HU = 1000.0


def synthetic_ct(
    size: tuple[int, int, int] = (12, 10, 8),
    spacing: tuple[float, float, float] = (0.8, 0.9, 2.0),
    origin: tuple[float, float, float] = (-40.0, 25.0, 100.0),
    direction: np.ndarray | None = None,
    marker_index: tuple[int, int, int] | None = None,
    marker_radius: int = 0,
    seed: int = 0,
) -> sitk.Image:
    """A float32 HU image (LPS world): soft-tissue noise around 40 HU, air in the first
    i-column, and a MARKER_HU cube of (2 * marker_radius + 1) voxels a side centred on
    ``marker_index`` (i, j, k) if given."""
    rng = np.random.default_rng(seed)
    voxels = rng.normal(40.0, 20.0, size=size[::-1]).round().astype(np.float32)  # (k, j, i)
    voxels[:, :, 0] = AIR_HU
    if marker_index is not None:
        i, j, k = marker_index
        r = marker_radius
        voxels[k - r : k + r + 1, j - r : j + r + 1, i - r : i + r + 1] = MARKER_HU
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def write_nifti(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


# --- bad inputs -------------------------------------------------------------------------


def make_truncated_gzip_nifti(folder: Path) -> Path:
    whole = write_nifti(synthetic_ct(), folder / "whole.nii.gz")
    data = whole.read_bytes()
    path = folder / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def make_truncated_raw_nifti(folder: Path) -> Path:
    whole = write_nifti(synthetic_ct(), folder / "whole.nii")
    data = whole.read_bytes()
    path = folder / "truncated.nii"
    path.write_bytes(data[: len(data) - 100])
    return path


def make_truncated_nrrd(folder: Path) -> Path:
    return _truncated_itk_file(folder, "nrrd")


def make_truncated_mha(folder: Path) -> Path:
    return _truncated_itk_file(folder, "mha")


def _truncated_itk_file(folder: Path, suffix: str) -> Path:
    path = folder / f"truncated.{suffix}"
    sitk.WriteImage(synthetic_ct(), str(path), useCompression=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def make_empty_file(folder: Path) -> Path:
    path = folder / "empty.nii.gz"
    path.touch()
    return path


def make_not_an_image(folder: Path) -> Path:
    path = folder / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"this is a text file, not an image\n" * 20))
    return path


def make_unsupported_suffix(folder: Path) -> Path:
    path = folder / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return path


def make_two_series_folder(folder: Path) -> Path:
    first = write_dicom_series(synthetic_ct(seed=1), folder / "first")
    second = write_dicom_series(synthetic_ct(seed=2), folder / "second")
    both = folder / "two_series"
    both.mkdir()
    for n, file in enumerate(first + second):
        shutil.move(file, both / f"{n:04d}.dcm")
    return both


def make_series_with_missing_slice(folder: Path) -> Path:
    write_dicom_series(synthetic_ct(), folder / "missing_slice", skip_slices=[4])
    return folder / "missing_slice"


def make_uneven_series(folder: Path) -> Path:
    """Slices 0-3 at 2 mm steps, then 3 mm steps: no single gap looks like a missing slice."""
    image = synthetic_ct(size=(6, 5, 12))
    files = write_dicom_series(image, folder / "uneven")
    for k, file in enumerate(files):
        dataset = pydicom.dcmread(file)
        z = 2.0 * min(k, 3) + 3.0 * max(k - 3, 0)
        dataset.ImagePositionPatient = [*image.GetOrigin()[:2], image.GetOrigin()[2] + z]
        dataset.save_as(file)
    return folder / "uneven"


def make_mr_series(folder: Path) -> Path:
    write_dicom_series(synthetic_ct(), folder / "mr", modality="MR")
    return folder / "mr"


def make_2d_image(folder: Path) -> Path:
    path = folder / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), path)
    return path


def make_single_slice_3d_image(folder: Path) -> Path:
    path = folder / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 1), np.int16), np.eye(4)), path)
    return path


def make_4d_image(folder: Path) -> Path:
    path = folder / "dynamic.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), path)
    return path


def make_nan_nifti(folder: Path) -> Path:
    voxels = np.zeros((8, 8, 8), np.float32)
    voxels[2, 3, 4] = np.nan
    voxels[5, 5, 5] = np.inf
    path = folder / "nan.nii.gz"
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), path)
    return path


def make_single_dicom_file(folder: Path) -> Path:
    return write_dicom_series(synthetic_ct(), folder / "series")[0]


def make_empty_folder(folder: Path) -> Path:
    path = folder / "no_dicom"
    path.mkdir()
    (path / "readme.txt").write_text("no images here")
    return path


def nonexistent_path(folder: Path) -> Path:
    return folder / "does_not_exist.nii.gz"


def _patched_nifti(
    path: Path,
    spacing: tuple[float, float, float] = (0.8, 0.9, 2.0),
    pixdim: tuple[float, float, float] | None = None,
    forms: tuple[int, int] | None = None,
    dims: tuple[int, int, int] | None = None,
) -> Path:
    """A small .nii whose raw header fields are then overwritten (nibabel itself would
    refuse or repair them): pixdim[1:4], (qform_code, sform_code), dim[1:4]."""
    image = nib.Nifti1Image(
        np.full((12, 10, 8), 40, np.int16), np.diag([*spacing, 1.0]).astype(float)
    )
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    nib.save(image, path)
    header = bytearray(path.read_bytes())
    if pixdim is not None:
        struct.pack_into("<3f", header, 80, *pixdim)
    if forms is not None:
        struct.pack_into("<2h", header, 252, *forms)
    if dims is not None:
        struct.pack_into("<3h", header, 42, *dims)
    path.write_bytes(bytes(header))
    return path


def make_zero_voxel_size_without_forms(folder: Path) -> Path:
    return _patched_nifti(folder / "pixdim0.nii", pixdim=(0, 0, 0), forms=(0, 0))


def make_zero_voxel_size(folder: Path) -> Path:
    return _patched_nifti(folder / "pixdim0_sform.nii", pixdim=(0.8, 0, 2.0))


def make_negative_voxel_size(folder: Path) -> Path:
    return _patched_nifti(folder / "negative.nii", pixdim=(-0.8, 0.9, 2.0), forms=(1, 0))


def make_micrometre_voxels(folder: Path) -> Path:
    return _patched_nifti(folder / "tiny_voxels.nii", spacing=(1e-6, 1e-6, 1e-6))


def make_metre_voxels(folder: Path) -> Path:
    return _patched_nifti(folder / "huge_voxels.nii", spacing=(1000.0, 1000.0, 1000.0))


def make_absurd_voxel_count(folder: Path) -> Path:
    return _patched_nifti(folder / "huge_count.nii", dims=(30000, 30000, 30000))


def make_absurd_spacing_metaimage(folder: Path) -> Path:
    path = folder / "far.mha"
    sitk.WriteImage(synthetic_ct(spacing=(0.8, 0.9, 1000.0)), str(path))
    return path


def _dicom_series_with_bad_slice(folder: Path, name: str, damage: Callable[[Path], None]) -> Path:
    files = write_dicom_series(synthetic_ct(), folder / name)
    damage(files[4])
    return folder / name


def make_dicom_slice_without_pixel_data(folder: Path) -> Path:
    def drop_pixels(file: Path) -> None:
        dataset = pydicom.dcmread(file)
        del dataset.PixelData
        dataset.save_as(file)

    return _dicom_series_with_bad_slice(folder, "no_pixels", drop_pixels)


def make_dicom_truncated_slice(folder: Path) -> Path:
    def cut_pixels(file: Path) -> None:
        file.write_bytes(file.read_bytes()[:-100])

    return _dicom_series_with_bad_slice(folder, "truncated_slice", cut_pixels)


def make_dicom_slice_cut_in_its_header(folder: Path) -> Path:
    def cut_header(file: Path) -> None:
        file.write_bytes(file.read_bytes()[:400])

    return _dicom_series_with_bad_slice(folder, "cut_header", cut_header)


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated_gzip": (make_truncated_gzip_nifti, "truncated"),
    "truncated_raw_nifti": (make_truncated_raw_nifti, "truncated"),
    "truncated_nrrd": (make_truncated_nrrd, "cannot be read as nrrd"),
    "truncated_mha": (make_truncated_mha, "cannot be read as metaimage"),
    "empty_file": (make_empty_file, "empty"),
    "not_an_image": (make_not_an_image, "NIfTI"),
    "unsupported_suffix": (make_unsupported_suffix, "unsupported file type"),
    "two_series": (make_two_series_folder, "holds 2 DICOM series"),
    "missing_slice": (make_series_with_missing_slice, "missing slice"),
    "uneven_spacing": (make_uneven_series, "uneven slice spacing"),
    "mr_series": (make_mr_series, "modality is MR"),
    "2d_image": (make_2d_image, "not a 3D volume"),
    "single_slice": (make_single_slice_3d_image, "not a 3D volume"),
    "4d_image": (make_4d_image, "4D with 3 volumes"),
    "nan_voxels": (make_nan_nifti, "2 NaN or infinite voxels"),
    "single_dicom_file": (make_single_dicom_file, "single DICOM file"),
    "folder_without_dicom": (make_empty_folder, "no DICOM series"),
    "nonexistent": (nonexistent_path, "does not exist"),
    "voxel_size_zero_no_forms": (make_zero_voxel_size_without_forms, "zero or negative"),
    "voxel_size_zero": (make_zero_voxel_size, "zero or negative"),
    "voxel_size_negative": (make_negative_voxel_size, "zero or negative"),
    "voxel_size_1e-6_mm": (make_micrometre_voxels, "below the plausible minimum of 0.05 mm"),
    "voxel_size_1000_mm": (make_metre_voxels, "above the plausible maximum of 20.0 mm"),
    "voxel_count_absurd": (make_absurd_voxel_count, "above the limit of 1,000,000,000"),
    "metaimage_1000_mm_slices": (make_absurd_spacing_metaimage, "above the plausible maximum"),
    "dicom_slice_without_pixels": (
        make_dicom_slice_without_pixel_data,
        "slice file '0005.dcm' has no pixel data",
    ),
    "dicom_truncated_slice": (make_dicom_truncated_slice, "slice file '0005.dcm' is truncated"),
    "dicom_slice_cut_in_header": (
        make_dicom_slice_cut_in_its_header,
        "slice file '0005.dcm' is truncated or damaged",
    ),
}
