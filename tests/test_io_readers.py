"""read_image on synthetic inputs: formats, rescale, slice order, gantry tilt, bad inputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_fixtures import BAD_INPUTS, make_two_series_folder, synthetic_ct, write_nifti

from voxelfm.errors import InputError
from voxelfm.io.dicom_write import write_dicom_series
from voxelfm.io.readers import read_image, sha256_of_files


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_one_line_naming_the_file(tmp_path, case):
    build, reason = BAD_INPUTS[case]
    path = build(tmp_path)
    with pytest.raises(InputError) as caught:
        read_image(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert reason in caught.value.reason


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_file_formats_read_identical_voxels_and_geometry(tmp_path, suffix):
    direction = np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=float)
    source = synthetic_ct(direction=direction)
    path = write_nifti(source, tmp_path / f"ct{suffix}")
    image, meta = read_image(path)
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(source)
    )
    np.testing.assert_allclose(image.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), source.GetOrigin(), atol=1e-4)
    assert meta["original_shape"] == list(source.GetSize())
    assert meta["original_spacing"] == pytest.approx(source.GetSpacing())
    # LPS columns (0,0,-1), (1,0,0), (0,-1,0) are RAS (0,0,-1), (-1,0,0), (0,1,0): I, L, A
    assert meta["original_axcodes"] == "ILA"
    assert meta["warnings"] == []


def test_nifti_scl_slope_and_inter_are_applied_once(tmp_path):
    stored = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nifti = nib.Nifti1Image(stored, np.diag([2.0, 3.0, 4.0, 1.0]))
    nifti.header.set_slope_inter(2.0, -1024.0)
    nib.save(nifti, tmp_path / "scaled.nii.gz")
    image, _ = read_image(tmp_path / "scaled.nii.gz")
    hu = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (i, j, k) like nibabel
    np.testing.assert_array_equal(hu, stored * 2.0 - 1024.0)


@pytest.mark.parametrize(
    "slope, intercept", [(1.0, -1024.0), (1.0, 0.0), (0.5, -1000.0), (2.0, -3000.0)]
)
def test_dicom_rescale_is_applied_once(tmp_path, slope, intercept):
    source = synthetic_ct()
    write_dicom_series(source, tmp_path / "s", rescale_slope=slope, rescale_intercept=intercept)
    image, meta = read_image(tmp_path / "s")
    assert meta["source_format"] == "dicom"
    stored = np.round((sitk.GetArrayFromImage(source) - intercept) / slope)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), stored * slope + intercept)


def test_dicom_slices_are_sorted_by_position_not_instance_number(tmp_path):
    source = synthetic_ct(direction=np.diag([1.0, 1.0, -1.0]))  # slices run feet-ward
    files = write_dicom_series(source, tmp_path / "s")
    rng = np.random.default_rng(0)
    for file, number in zip(files, rng.permutation(len(files)) + 1):
        dataset = pydicom.dcmread(file)
        dataset.InstanceNumber = int(number)
        dataset.save_as(file)
    image, _ = read_image(tmp_path / "s")
    # Sorted along the normal (+z, head-ward): the source's slice order reversed.
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(source)[::-1]
    )
    assert image.GetDirection()[8] == pytest.approx(1.0)
    np.testing.assert_allclose(
        image.TransformIndexToPhysicalPoint((3, 2, 0)),
        source.TransformIndexToPhysicalPoint((3, 2, source.GetSize()[2] - 1)),
        atol=1e-4,
    )


def test_gantry_tilt_keeps_every_slice_where_its_header_puts_it(tmp_path):
    files = write_dicom_series(synthetic_ct(), tmp_path / "s", gantry_tilt_deg=15.0)
    image, meta = read_image(tmp_path / "s")
    assert any("gantry tilt of 15.00 degrees" in w for w in meta["warnings"])
    for k, file in enumerate(files):
        header = pydicom.dcmread(file, stop_before_pixels=True)
        corner = np.array(header.ImagePositionPatient, dtype=float)
        row, column = np.array(header.ImageOrientationPatient, dtype=float).reshape(2, 3)
        dy, dx = (float(v) for v in header.PixelSpacing)
        expected = corner + 4 * dx * row + 3 * dy * column  # pixel at column 4, row 3
        np.testing.assert_allclose(
            image.TransformIndexToPhysicalPoint((4, 3, k)), expected, atol=1e-4
        )


def test_two_series_folder_reads_the_series_asked_for(tmp_path):
    folder = make_two_series_folder(tmp_path)
    uids = sorted(
        {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in folder.iterdir()}
    )
    seeds_seen = set()
    for uid in uids:
        image, _ = read_image(folder, series_uid=uid)
        for seed in (1, 2):
            if np.array_equal(
                sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(synthetic_ct(seed=seed))
            ):
                seeds_seen.add(seed)
    assert seeds_seen == {1, 2}
    with pytest.raises(InputError, match="no series with the given series_uid"):
        read_image(folder, series_uid="1.2.3")


def test_single_volume_4d_file_is_accepted_as_3d(tmp_path):
    voxels = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4, 1)
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), tmp_path / "one_volume.nii.gz")
    image, meta = read_image(tmp_path / "one_volume.nii.gz")
    assert meta["original_shape"] == [6, 5, 4]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), voxels[..., 0])


def test_source_sha256_covers_the_series_files_in_slice_order(tmp_path):
    files = write_dicom_series(synthetic_ct(direction=np.diag([1.0, 1.0, -1.0])), tmp_path / "s")
    _, meta = read_image(tmp_path / "s")
    assert meta["source_sha256"] == sha256_of_files(files[::-1])  # written feet-ward
    assert meta["source_sha256"] != sha256_of_files(files)
