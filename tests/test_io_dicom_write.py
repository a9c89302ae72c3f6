"""The DICOM series writer, checked against SimpleITK's and pydicom's independent readings."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_fixtures import synthetic_ct

from voxelfm.io.dicom_write import write_dicom_series

OBLIQUE = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()  # flattened 3x3


def _read_with_sitk(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([1.0, -1.0, -1.0]), np.array(OBLIQUE).reshape(3, 3)],
    ids=["identity", "flipped", "oblique"],
)
def test_round_trip_through_simpleitk_keeps_hu_and_geometry(tmp_path, direction):
    image = synthetic_ct(direction=direction)
    write_dicom_series(image, tmp_path / "series")
    read = _read_with_sitk(tmp_path / "series")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), image.GetDirection(), atol=1e-5)


@pytest.mark.parametrize(
    "slope, intercept, stored_dtype",
    [(1.0, -1024.0, np.uint16), (1.0, 0.0, np.int16), (0.5, -1000.0, np.uint16)],
)
def test_stored_values_and_rescale_tags(tmp_path, slope, intercept, stored_dtype):
    image = synthetic_ct()
    files = write_dicom_series(
        image, tmp_path / "s", rescale_slope=slope, rescale_intercept=intercept
    )
    hu = sitk.GetArrayFromImage(image)  # (k, j, i)
    for k, file in enumerate(files):
        dataset = pydicom.dcmread(file)
        assert dataset.pixel_array.dtype == stored_dtype
        assert (float(dataset.RescaleSlope), float(dataset.RescaleIntercept)) == (slope, intercept)
        np.testing.assert_array_equal(dataset.pixel_array, np.round((hu[k] - intercept) / slope))


def test_slice_positions_follow_the_direction_matrix(tmp_path):
    image = synthetic_ct(direction=np.array(OBLIQUE).reshape(3, 3))
    files = write_dicom_series(image, tmp_path / "s")
    direction = np.array(OBLIQUE).reshape(3, 3)
    for k, file in enumerate(files):
        dataset = pydicom.dcmread(file, stop_before_pixels=True)
        expected = np.array(image.GetOrigin()) + k * image.GetSpacing()[2] * direction[:, 2]
        np.testing.assert_allclose(
            [float(v) for v in dataset.ImagePositionPatient], expected, atol=1e-4
        )
        np.testing.assert_allclose(
            [float(v) for v in dataset.ImageOrientationPatient],
            np.r_[direction[:, 0], direction[:, 1]],
            atol=1e-6,
        )
        assert [float(v) for v in dataset.PixelSpacing] == pytest.approx(image.GetSpacing()[1::-1])
        assert dataset.InstanceNumber == k + 1
        assert dataset.Modality == "CT"
        assert dataset.SOPClassUID == pydicom.uid.CTImageStorage


def test_skip_slices_and_gantry_tilt(tmp_path):
    image = synthetic_ct()
    tilt = 20.0
    files = write_dicom_series(image, tmp_path / "s", skip_slices=[2, 5], gantry_tilt_deg=tilt)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert [d.InstanceNumber for d in datasets] == [1, 2, 4, 5, 7, 8]
    dz = image.GetSpacing()[2]
    for dataset in datasets:
        k = dataset.InstanceNumber - 1
        assert float(dataset.GantryDetectorTilt) == tilt
        # identity direction: the shear moves slice k along +y (the column direction)
        expected = np.array(image.GetOrigin()) + [0, k * dz * np.tan(np.radians(tilt)), k * dz]
        np.testing.assert_allclose(
            [float(v) for v in dataset.ImagePositionPatient], expected, atol=1e-4
        )


def test_uids_are_shared_within_a_series_and_unique_per_slice(tmp_path):
    files = write_dicom_series(
        synthetic_ct(), tmp_path / "s", series_instance_uid="1.2.3.4", patient_id="SYN-001"
    )
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {d.SeriesInstanceUID for d in datasets} == {"1.2.3.4"}
    assert len({d.StudyInstanceUID for d in datasets}) == 1
    assert len({d.SOPInstanceUID for d in datasets}) == len(files)
    assert {d.PatientID for d in datasets} == {"SYN-001"}


def test_write_is_atomic_and_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    write_dicom_series(synthetic_ct(), tmp_path / "empty")  # an empty folder may be reused
    with pytest.raises(FileExistsError):
        write_dicom_series(synthetic_ct(), tmp_path / "empty")
    with pytest.raises(ValueError, match="fits neither"):
        write_dicom_series(synthetic_ct(), tmp_path / "overflow", rescale_slope=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary folders left
