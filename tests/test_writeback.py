"""Write-back of canonical label maps into the source image's space: exact on a reorienting
(non-RAS) round trip in every file format, Dice on a real CT resampled at 4 mm."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.io.dicom_write import write_dicom_series
from voxelfm.io.preprocess import preprocess_scan
from voxelfm.io.writeback import canonical_label_image, write_label_map_to_source

# LPS direction (columns = index axes) of a P, L, I image, as OpenKBP's.
PLI_DIRECTION = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def _source_pair(tmp_path, suffix: str, direction=PLI_DIRECTION):
    """A small anisotropic scan and a label map on its grid, written in ``suffix`` format."""
    size, spacing, origin = (14, 11, 9), (1.3, 0.9, 2.5), (12.0, -30.0, 85.0)
    rng = np.random.default_rng(0)
    labels = np.zeros(size[::-1], dtype=np.uint8)  # (k, j, i)
    labels[2:6, 3:8, 4:11] = 1
    labels[5:8, 1:4, 1:5] = 2
    labels[0, 0, 0] = 300 % 256  # a corner voxel: edges must survive too
    images = []
    for array in (rng.normal(0, 200, size[::-1]).astype(np.float32), labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(np.asarray(direction, float).ravel().tolist())
        images.append(image)
    image_path, label_path = tmp_path / f"ct{suffix}", tmp_path / f"seg{suffix}"
    sitk.WriteImage(images[0], str(image_path))
    sitk.WriteImage(images[1], str(label_path))
    return image_path, label_path, labels


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_reoriented_label_map_comes_back_exactly(tmp_path, suffix):
    image_path, label_path, labels = _source_pair(tmp_path, suffix)
    # Native spacing: the canonical grid is the source grid reoriented to R, A, S.
    canonical = preprocess_scan(image_path, {"seg": label_path}, spacing=None)
    assert canonical.labels["seg"].shape != labels.shape[::-1]  # axes really were permuted
    out = write_label_map_to_source(
        canonical.labels["seg"],
        canonical.spacing,
        canonical.origin,
        image_path,
        tmp_path / "back.nii.gz",
    )
    back = sitk.ReadImage(str(out))
    source = sitk.ReadImage(str(image_path))
    assert back.GetSize() == source.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), source.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), source.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    assert back.GetPixelID() == sitk.sitkUInt8


def test_nifti_source_keeps_its_affine(tmp_path):
    image_path, label_path, labels = _source_pair(tmp_path, ".nii.gz")
    canonical = preprocess_scan(image_path, {"seg": label_path}, spacing=None)
    out = write_label_map_to_source(
        canonical.labels["seg"], canonical.spacing, canonical.origin, image_path, tmp_path / "b.nii"
    )
    written, source = nib.load(out), nib.load(image_path)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == ("P", "L", "I")
    # nibabel's (i, j, k) array is the transpose of ITK's (k, j, i) one.
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels.transpose(2, 1, 0))


def test_dicom_series_source(tmp_path):
    image_path, label_path, labels = _source_pair(tmp_path, ".nii.gz")
    series = tmp_path / "series"
    write_dicom_series(sitk.ReadImage(str(image_path)), series)
    canonical = preprocess_scan(series, {"seg": label_path}, spacing=None)
    out = write_label_map_to_source(
        canonical.labels["seg"], canonical.spacing, canonical.origin, series, tmp_path / "d.nii.gz"
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), labels)


def test_canonical_image_geometry():
    labels = np.zeros((4, 3, 2), dtype=np.int64)
    labels[3, 0, 1] = 5  # voxel (x=3, y=0, z=1)
    image = canonical_label_image(labels, (2.0, 3.0, 4.0), (10.0, 20.0, 30.0))
    # Find the labelled voxel's world point through ITK and convert LPS -> RAS.
    index = np.argwhere(sitk.GetArrayFromImage(image) == 5)[0][::-1]
    lps = image.TransformIndexToPhysicalPoint([int(i) for i in index])
    np.testing.assert_allclose([-lps[0], -lps[1], lps[2]], [10 + 3 * 2, 20 + 0 * 3, 30 + 1 * 4])
    assert image.GetPixelID() == sitk.sitkUInt8
    assert canonical_label_image(labels + 300, (1, 1, 1), (0, 0, 0)).GetPixelID() == sitk.sitkUInt16


def test_bad_inputs(tmp_path):
    image_path, _, _ = _source_pair(tmp_path, ".nii.gz")
    labels = np.zeros((3, 3, 3), dtype=np.uint8)
    with pytest.raises(VoxelFMError, match="NIfTI"):
        write_label_map_to_source(labels, (1, 1, 1), (0, 0, 0), image_path, tmp_path / "x.nrrd")
    with pytest.raises(VoxelFMError, match="integers"):
        write_label_map_to_source(
            labels * 0.5, (1, 1, 1), (0, 0, 0), image_path, tmp_path / "x.nii"
        )
    with pytest.raises(InputError, match="does not exist"):
        write_label_map_to_source(
            labels, (1, 1, 1), (0, 0, 0), tmp_path / "no.nii", tmp_path / "x.nii"
        )
    assert not list(tmp_path.glob("x.nii*")) and not list(tmp_path.glob(".x.nii*"))


@pytest.mark.realdata
def test_openkbp_oars_round_trip_at_4mm(real_data, tmp_path):
    patient = real_data / "openkbp" / "openkbp_train_pt_1"
    if not (patient / "oars.nii.gz").is_file():
        pytest.skip(f"{patient} not found")
    canonical = preprocess_scan(
        patient / "ct.nii.gz", {"oars": patient / "oars.nii.gz"}, spacing=(4.0, 4.0, 4.0)
    )
    out = write_label_map_to_source(
        canonical.labels["oars"],
        canonical.spacing,
        canonical.origin,
        patient / "ct.nii.gz",
        tmp_path / "oars_back.nii.gz",
    )
    written, original = nib.load(out), nib.load(patient / "oars.nii.gz")
    source = nib.load(patient / "ct.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    truth, back = np.asarray(original.dataobj), np.asarray(written.dataobj)
    organs = [v for v in np.unique(truth) if v > 0]
    assert len(organs) >= 3
    dice = {
        int(v): 2 * np.sum((truth == v) & (back == v)) / (np.sum(truth == v) + np.sum(back == v))
        for v in organs
    }
    pooled = 2 * np.sum((truth == back) & (truth > 0)) / (np.sum(truth > 0) + np.sum(back > 0))
    assert pooled > 0.8, dice
    # A swapped axis or flipped sign would land organs elsewhere: Dice near 0, not ~0.7.
    assert min(dice.values()) > 0.5, dice
