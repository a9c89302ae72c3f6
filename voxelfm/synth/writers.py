"""Write rendered scans to disk as NIfTI files or DICOM series, in their own geometry.

Files keep the scan's orientation, spacing and obliquity (that is what ingestion has to
undo) and store HU in several encodings real data uses: int16, float32, uint16 with
``scl_inter = -1024`` in NIfTI; assorted RescaleSlope / RescaleIntercept in DICOM.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from pydicom.uid import generate_uid

from voxelfm.conventions import HU_MIN
from voxelfm.io.dicom_write import write_dicom_series
from voxelfm.io.geometry import LPS_TO_RAS
from voxelfm.synth.geometry import ScanGeometry

_NIFTI_SCANNER_CODE = 1  # qform/sform code "scanner anatomical"


def save_nifti(data: np.ndarray, geometry: ScanGeometry, path: Path, *, encoding: str) -> None:
    """Write ``data`` (I, J, K) on ``geometry`` atomically as NIfTI-1.

    encoding: a numpy dtype name ("int16", "float32", "uint8" for label maps), or "uint16"
    to store HU - HU_MIN unsigned with ``scl_inter = HU_MIN``, as some converters do.
    Both qform and sform hold the affine, so nibabel and ITK read the same geometry.
    """
    if encoding == "uint16":
        stored = (data.astype(np.int32) - HU_MIN).astype(np.uint16)
    else:
        stored = data.astype(encoding)
    image = nib.Nifti1Image(stored, geometry.affine)
    image.set_qform(geometry.affine, code=_NIFTI_SCANNER_CODE)
    image.set_sform(geometry.affine, code=_NIFTI_SCANNER_CODE)
    if encoding == "uint16":
        image.header.set_slope_inter(1.0, float(HU_MIN))
    # nibabel picks the format from the suffix, so the temporary name keeps ".nii.gz".
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def dicom_reading_order(
    data: np.ndarray, geometry: ScanGeometry
) -> tuple[np.ndarray, ScanGeometry]:
    """``data`` (I, J, K) and ``geometry`` as DICOM readers return the series written from them.

    Readers stack slices along the normal row x column. A series written with its slice axis
    the other way (feet-first numbering, mirrored rows) comes back with the slice axis
    reversed; the label map of such a series is stored that way so that reading the series
    and the label map gives the same grid, voxel for voxel.
    """
    row, column, slice_step = geometry.affine[:3, :3].T
    if np.dot(np.cross(row, column), slice_step) >= 0:
        return data, geometry
    return data[:, :, ::-1], geometry.flipped(2)


def save_dicom(
    hu: np.ndarray,
    geometry: ScanGeometry,
    out_dir: Path,
    *,
    rescale: tuple[float, float],
    patient_id: str,
    uid_seed: str,
    description: str = "synthetic CT",
) -> None:
    """Write ``hu`` (I, J, K) as a DICOM series, one slice per index along K.

    ``rescale`` is (RescaleSlope, RescaleIntercept). Series and study UIDs derive from
    ``uid_seed`` so a regenerated cohort names its series the same way.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)))  # ITK: (K, J, I)
    linear = geometry.affine[:3, :3]
    image.SetSpacing(geometry.spacing.tolist())
    image.SetOrigin((LPS_TO_RAS @ geometry.affine[:3, 3]).tolist())
    image.SetDirection((LPS_TO_RAS @ (linear / geometry.spacing)).ravel().tolist())
    write_dicom_series(
        image,
        out_dir,
        rescale_slope=rescale[0],
        rescale_intercept=rescale[1],
        series_instance_uid=generate_uid(entropy_srcs=[uid_seed, "series"]),
        study_instance_uid=generate_uid(entropy_srcs=[uid_seed, "study"]),
        patient_id=patient_id,
        series_description=description,
    )
