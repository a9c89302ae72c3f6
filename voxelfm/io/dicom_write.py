"""Write a 3D HU image as a DICOM series, one file per slice.

Used by the synthetic-cohort generator and by tests that need DICOM input with known
geometry (any direction matrix, missing slices, gantry tilt, non-CT modality).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

# SOP classes of the modalities we write; anything else becomes Secondary Capture.
_SOP_CLASS_BY_MODALITY = {
    "CT": pydicom.uid.CTImageStorage,
    "MR": pydicom.uid.MRImageStorage,
    "PT": pydicom.uid.PositronEmissionTomographyImageStorage,
}


def write_dicom_series(
    image: sitk.Image,
    out_dir: str | os.PathLike,
    *,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    modality: str = "CT",
    series_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    patient_id: str = "ANONYMOUS",
    series_description: str = "",
    gantry_tilt_deg: float = 0.0,
    skip_slices: Sequence[int] = (),
) -> list[Path]:
    """Write ``image`` (3D, HU, ITK LPS world) as a DICOM series in ``out_dir``.

    Slice k of the series is the ITK slice at index k along the image's third axis; its
    ImagePositionPatient is the world position of voxel (0, 0, k) and its
    ImageOrientationPatient holds the first two columns of the direction matrix, so any
    direction (oblique, flipped, permuted) round-trips. Stored values are
    ``round((HU - rescale_intercept) / rescale_slope)``, as uint16 when none is negative
    (as most scanners do) and int16 otherwise.

    ``gantry_tilt_deg`` writes GantryDetectorTilt and shifts slice k by
    ``k * spacing_z * tan(tilt)`` along the column direction, which is how a tilted gantry's
    slices sit: stacked along the table, not along the slice normal. The pixel data is not
    resampled, so the written series is a sheared version of ``image``.

    ``skip_slices`` lists slice indices not written (InstanceNumber keeps the original
    numbering), to simulate a missing slice.

    ``out_dir`` must not exist or be empty; files are written to a temporary sibling folder
    that is renamed into place, so a reader never sees a half-written series.
    Returns the written file paths in slice order.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"write_dicom_series needs a 3D image, got {image.GetDimension()}D")
    if rescale_slope == 0:
        raise ValueError("rescale_slope must be non-zero")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")

    hu = sitk.GetArrayFromImage(image).astype(np.float64)  # (Z, Y, X) = (slice, row, column)
    stored = np.round((hu - rescale_intercept) / rescale_slope)
    pixel_dtype = _stored_dtype(stored)
    stored = stored.astype(pixel_dtype)

    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    row_cosines, column_cosines = direction[:, 0], direction[:, 1]
    tilt_shift = spacing[2] * np.tan(np.deg2rad(gantry_tilt_deg)) * column_cosines
    normal = np.cross(row_cosines, column_cosines)

    series_uid = series_instance_uid or generate_uid()
    study_uid = study_instance_uid or generate_uid()
    frame_uid = generate_uid()
    sop_class = _SOP_CLASS_BY_MODALITY.get(modality, pydicom.uid.SecondaryCaptureImageStorage)
    skipped = {int(k) for k in skip_slices}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        names = []
        for k in range(stored.shape[0]):
            if k in skipped:
                continue
            position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k))) + k * tilt_shift
            ds = _slice_dataset(
                pixels=stored[k],
                sop_class=sop_class,
                modality=modality,
                position=position,
                orientation=np.concatenate([row_cosines, column_cosines]),
                pixel_spacing=(spacing[1], spacing[0]),  # DICOM: (between rows, between columns)
                slice_thickness=spacing[2],
                slice_location=float(position @ normal),
                instance_number=k + 1,
                rescale_slope=rescale_slope,
                rescale_intercept=rescale_intercept,
                gantry_tilt_deg=gantry_tilt_deg,
                series_uid=series_uid,
                study_uid=study_uid,
                frame_uid=frame_uid,
                patient_id=patient_id,
                series_description=series_description,
            )
            name = f"{k + 1:04d}.dcm"
            ds.save_as(tmp_dir / name, enforce_file_format=True)
            names.append(name)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above; os.replace cannot replace a directory
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return [out_dir / name for name in names]


def _stored_dtype(stored: np.ndarray) -> type[np.integer]:
    lo, hi = float(stored.min()), float(stored.max())
    if lo >= 0 and hi <= np.iinfo(np.uint16).max:
        return np.uint16
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return np.int16
    raise ValueError(
        f"stored values span [{lo:.0f}, {hi:.0f}], which fits neither int16 nor uint16; "
        "change rescale_slope/rescale_intercept"
    )


def _ds(values) -> list[DSfloat]:
    """Decimal strings limited to DICOM's 16 characters."""
    return [DSfloat(float(v), auto_format=True) for v in np.atleast_1d(values)]


def _slice_dataset(
    *,
    pixels: np.ndarray,
    sop_class: str,
    modality: str,
    position: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    slice_location: float,
    instance_number: int,
    rescale_slope: float,
    rescale_intercept: float,
    gantry_tilt_deg: float,
    series_uid: str,
    study_uid: str,
    frame_uid: str,
    patient_id: str,
    series_description: str,
) -> pydicom.Dataset:
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]

    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(orientation)
    ds.PixelSpacing = _ds(pixel_spacing)
    ds.SliceThickness = _ds(slice_thickness)[0]
    ds.SliceLocation = _ds(slice_location)[0]
    ds.GantryDetectorTilt = _ds(gantry_tilt_deg)[0]

    ds.RescaleSlope = _ds(rescale_slope)[0]
    ds.RescaleIntercept = _ds(rescale_intercept)[0]
    ds.RescaleType = "HU"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds
