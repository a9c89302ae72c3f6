"""Canonical RAS grid: every orientation, oblique and tilted input, anti-aliasing, labels."""

from __future__ import annotations

import hashlib
import itertools
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_fixtures import synthetic_ct, write_nifti

from voxelfm.conventions import HU_MAX, HU_MIN, PREPROCESSING_VERSION
from voxelfm.errors import InputError
from voxelfm.io.canonical import CanonicalGrid, to_canonical
from voxelfm.io.dicom_write import write_dicom_series
from voxelfm.io.preprocess import preprocess_scan

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
MARKER = (2, 4, 1)

# All 48 signed axis permutations: every way an array's axes can map onto L/R, P/A, I/S.
ORIENTATIONS = [
    np.eye(3)[:, list(perm)] * np.array(signs)
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1.0, -1.0), repeat=3)
]
OBLIQUE = np.array(sitk.Euler3DTransform((0, 0, 0), 0.35, -0.25, 0.6).GetMatrix()).reshape(3, 3)


def _orientation_id(direction: np.ndarray) -> str:
    return "".join(nib.orientations.aff2axcodes(np.diag([*LPS_TO_RAS, 1]) @ _affine3(direction)))


def _affine3(direction: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction
    return affine


def _ras(image: sitk.Image, index) -> np.ndarray:
    """RAS mm of a (possibly fractional) voxel index, by SimpleITK's own geometry."""
    return LPS_TO_RAS * np.array(
        image.TransformContinuousIndexToPhysicalPoint([float(i) for i in index])
    )


def _marker_centroid(volume) -> np.ndarray:
    """RAS mm centroid of the voxels brighter than the soft-tissue background."""
    weights = np.clip(volume.image.astype(float) - 200.0, 0, None)  # (X, Y, Z)
    ijk = np.argwhere(weights > 0)
    centre = (ijk * weights[tuple(ijk.T)][:, None]).sum(axis=0) / weights.sum()
    return volume.voxel_to_world(centre)


@pytest.mark.parametrize("direction", ORIENTATIONS, ids=[_orientation_id(d) for d in ORIENTATIONS])
def test_every_orientation_matches_nibabel_closest_canonical(tmp_path, direction):
    source = synthetic_ct(
        size=(7, 6, 5), spacing=(0.8, 1.1, 1.7), direction=direction, marker_index=MARKER
    )
    path = write_nifti(source, tmp_path / "ct.nii.gz")

    volume = preprocess_scan(path, spacing=None)

    expected = nib.as_closest_canonical(nib.load(path))
    np.testing.assert_array_equal(volume.image, np.asarray(expected.dataobj))
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-4)
    marker_voxel = np.unravel_index(np.argmax(volume.image), volume.image.shape)
    np.testing.assert_allclose(volume.voxel_to_world(marker_voxel), _ras(source, MARKER), atol=1e-4)
    assert volume.meta["original_axcodes"] == _orientation_id(direction)


@pytest.mark.parametrize(
    "direction", ORIENTATIONS[::7] + [OBLIQUE], ids=lambda d: _orientation_id(d)
)
def test_marker_lands_at_its_world_position_on_the_1p5mm_grid(tmp_path, direction):
    source = synthetic_ct(
        size=(12, 11, 10),
        spacing=(0.7, 0.9, 2.0),
        direction=direction,
        marker_index=(5, 6, 4),
        marker_radius=1,
    )
    write_dicom_series(source, tmp_path / "series")
    volume = preprocess_scan(tmp_path / "series")
    assert volume.spacing == (1.5, 1.5, 1.5)
    np.testing.assert_allclose(_marker_centroid(volume), _ras(source, (5, 6, 4)), atol=0.75)


def test_gantry_tilted_series_puts_the_marker_where_its_slice_header_says(tmp_path):
    source = synthetic_ct(
        size=(12, 11, 10), spacing=(0.7, 0.9, 2.0), marker_index=(5, 6, 4), marker_radius=1
    )
    tilt = 20.0
    write_dicom_series(source, tmp_path / "series", gantry_tilt_deg=tilt)
    volume = preprocess_scan(tmp_path / "series", spacing=(0.7, 0.7, 0.7))
    # The writer shifts slice k by k * dz * tan(tilt) along +y (LPS), i.e. -y in RAS.
    expected = _ras(source, (5, 6, 4)) + [0, -4 * 2.0 * np.tan(np.radians(tilt)), 0]
    np.testing.assert_allclose(_marker_centroid(volume), expected, atol=0.35)
    assert any("gantry tilt" in w for w in volume.meta["warnings"])


def test_grid_covers_an_oblique_image_by_less_than_one_voxel_of_margin():
    image = synthetic_ct(size=(20, 15, 9), spacing=(0.7, 0.9, 2.5), direction=OBLIQUE)
    grid = CanonicalGrid.covering(image, (1.5, 1.2, 1.0))
    corners = np.array(
        [_ras(image, c) for c in itertools.product(*[(-0.5, n - 0.5) for n in image.GetSize()])]
    )
    spacing, origin = np.array(grid.spacing), np.array(grid.origin)
    grid_low = origin - spacing / 2
    grid_high = origin + (np.array(grid.shape) - 0.5) * spacing
    assert np.all(grid_low <= corners.min(axis=0) + 1e-6)
    assert np.all(grid_high >= corners.max(axis=0) - 1e-6)
    assert np.all(
        (corners.min(axis=0) - grid_low) + (grid_high - corners.max(axis=0)) < spacing + 1e-6
    )


def test_native_spacing_follows_the_axis_each_ras_axis_came_from():
    permuted = np.eye(3)[:, [2, 0, 1]]  # image axes point S, L, P
    image = synthetic_ct(size=(5, 6, 7), spacing=(0.5, 0.75, 3.0), direction=permuted)
    grid = CanonicalGrid.covering(image, None)
    assert grid.spacing == (0.75, 3.0, 0.5)  # R from axis 1, A from axis 2, S from axis 0
    assert grid.shape == (6, 7, 5)


def test_antialiasing_averages_fine_stripes_but_keeps_a_ramp():
    x = np.arange(60)
    stripes = np.where(x % 2 == 0, 100.0, -100.0)[None, None, :] * np.ones((6, 6, 60))  # (k, j, i)
    ramp = (2.0 * x)[None, None, :] * np.ones((6, 6, 60))
    aliased_std = {}
    for name, voxels in (("stripes", stripes), ("ramp", ramp)):
        image = sitk.GetImageFromArray(voxels.astype(np.float32))
        image.SetSpacing((0.5, 1.5, 1.5))
        for antialias in (True, False):
            array, spacing, origin = to_canonical(image, (1.5, 1.5, 1.5), antialias=antialias)
            inner = array[3:-3, 1:-1, 1:-1]  # away from the padded border
            if name == "stripes":
                aliased_std[antialias] = inner.std()
            else:
                # Index i of the source sits at RAS x = -0.5 * i (identity LPS direction).
                i = -(origin[0] + np.arange(array.shape[0])[3:-3] * spacing[0]) / 0.5
                np.testing.assert_allclose(
                    inner, np.broadcast_to(2.0 * i[:, None, None], inner.shape), atol=0.5
                )
    assert aliased_std[False] > 50  # plain linear sampling at 3x steps aliases the stripes
    assert aliased_std[True] < 10


def test_preprocess_rounds_clips_and_records_provenance(tmp_path):
    voxels = np.array([-3024.0, -1500.2, -40.4, 40.6, 2000.5, 5000.0], np.float32)
    nifti = nib.Nifti1Image(
        np.tile(voxels[:, None, None], (1, 3, 2)), np.diag([1.0, 2.0, 3.0, 1.0])
    )
    path = tmp_path / "float.nii.gz"
    nib.save(nifti, path)
    volume = preprocess_scan(path, spacing=None)
    assert volume.image.dtype == np.int16
    np.testing.assert_array_equal(volume.image[:, 0, 0], [HU_MIN, HU_MIN, -40, 41, 2000, HU_MAX])
    narrow = preprocess_scan(path, spacing=None, hu_range=(-100, 100))
    np.testing.assert_array_equal(narrow.image[:, 0, 0], [-100, -100, -40, 41, 100, 100])
    meta = volume.meta
    assert meta["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["preprocessing_version"] == PREPROCESSING_VERSION
    assert meta["source_format"] == "nifti"
    assert meta["original_shape"] == [6, 3, 2] and meta["original_axcodes"] == "RAS"
    assert meta["hu_range"] == [HU_MIN, HU_MAX] and meta["spacing"] == [1.0, 2.0, 3.0]
    json.dumps(meta)  # must be serialisable as is


def test_dicom_meta_holds_no_patient_identifiers(tmp_path):
    files = write_dicom_series(
        synthetic_ct(),
        tmp_path / "s",
        patient_id="PATIENT-SECRET-42",
        series_description="Jane Doe chest",
        series_instance_uid="1.2.826.0.1.99999",
    )
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    text = json.dumps(preprocess_scan(tmp_path / "s").meta)
    for secret in ("PATIENT-SECRET-42", "Jane", "1.2.826.0.1.99999", study_uid):
        assert secret not in text


def test_label_on_another_grid_lands_on_the_same_voxels(tmp_path):
    image = synthetic_ct(size=(10, 9, 8), spacing=(1.0, 1.0, 2.0))
    write_nifti(image, tmp_path / "ct.nii.gz")
    labels = np.zeros((8, 9, 10), np.uint16)  # (k, j, i)
    labels[2:5, 3:6, 4:8] = 3
    labels[5, 1, 1] = 300  # needs uint16
    same_grid = sitk.GetImageFromArray(labels)
    same_grid.CopyInformation(image)
    write_nifti(same_grid, tmp_path / "same.nrrd")
    # The same labels stored flipped along j and k, with the origin moved to match.
    flipped = sitk.Flip(same_grid, [False, True, True])
    assert flipped.GetDirection() != same_grid.GetDirection()
    write_nifti(flipped, tmp_path / "flipped.nii.gz")

    volume = preprocess_scan(
        tmp_path / "ct.nii.gz",
        {"same": tmp_path / "same.nrrd", "flipped": tmp_path / "flipped.nii.gz"},
        spacing=None,
    )
    assert volume.labels["same"].dtype == np.uint16
    np.testing.assert_array_equal(volume.labels["same"], volume.labels["flipped"])
    # Independent check: canonical (X, Y, Z) is the source (i, j, k) with i and j reversed (LPS).
    np.testing.assert_array_equal(volume.labels["same"], labels.transpose(2, 1, 0)[::-1, ::-1, :])
    assert any("'flipped' is on a different grid" in w for w in volume.meta["warnings"])


@pytest.mark.parametrize(
    "values, origin, reason",
    [
        (np.full((8, 10, 12), 0.5, np.float32), (-40.0, 25.0, 100.0), "non-integer"),
        (np.full((8, 10, 12), -1, np.int16), (-40.0, 25.0, 100.0), "negative"),
        (np.ones((8, 10, 12), np.uint8), (500.0, 25.0, 100.0), "does not overlap"),
    ],
    ids=["non_integer", "negative", "elsewhere"],
)
def test_unusable_label_map_is_refused(tmp_path, values, origin, reason):
    write_nifti(synthetic_ct(), tmp_path / "ct.nii.gz")
    label = sitk.GetImageFromArray(values)
    label.SetSpacing((0.8, 0.9, 2.0))
    label.SetOrigin(origin)
    write_nifti(label, tmp_path / "label.nii.gz")
    with pytest.raises(InputError, match=reason) as caught:
        preprocess_scan(tmp_path / "ct.nii.gz", {"organ": tmp_path / "label.nii.gz"})
    assert caught.value.path == str(tmp_path / "label.nii.gz")


def test_air_free_volume_is_flagged(tmp_path):
    image = sitk.GetImageFromArray(np.full((6, 6, 6), 30.0, np.float32))
    write_nifti(image, tmp_path / "no_air.nii.gz")
    assert any(
        "no voxel below" in w for w in preprocess_scan(tmp_path / "no_air.nii.gz").meta["warnings"]
    )
    write_nifti(synthetic_ct(), tmp_path / "air.nii.gz")
    assert preprocess_scan(tmp_path / "air.nii.gz").meta["warnings"] == []


@pytest.mark.parametrize("interpolator", ["linear", "nearest"])
@pytest.mark.parametrize(
    "direction", ORIENTATIONS[::5] + [OBLIQUE], ids=lambda d: _orientation_id(d)
)
def test_fast_resampling_matches_itk_resample(direction, interpolator):
    """The axis-by-axis path (inputs parallel to the grid after re-indexing) gives ITK's
    values: same interpolation, same edge handling, same padding outside the input."""
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.normal(0, 500, (9, 13, 11)).astype(np.float32))
    image.SetSpacing((0.8, 1.3, 2.1))
    image.SetOrigin((12.5, -30.0, 41.0))
    image.SetDirection(direction.ravel().tolist())
    # Finer, coarser and equal spacings, and a grid shifted to overhang the input.
    for spacing in [(0.6, 1.7, 2.1), (1.5, 1.5, 1.5), None]:
        grid = CanonicalGrid.covering(image, spacing)
        shifted = CanonicalGrid(
            grid.shape, grid.spacing, tuple(o + 0.37 * s for o, s in zip(grid.origin, grid.spacing))
        )
        for target in (grid, shifted):
            fast, _, _ = to_canonical(
                image, reference=target, interpolator=interpolator, antialias=False
            )
            itk = sitk.Resample(
                image,
                target.reference_image(),
                sitk.Transform(),
                sitk.sitkLinear if interpolator == "linear" else sitk.sitkNearestNeighbor,
                float(HU_MIN),
                sitk.sitkFloat32,
            )
            expected = sitk.GetArrayFromImage(itk).transpose(2, 1, 0)
            assert fast.flags.c_contiguous and fast.dtype == np.float32
            if interpolator == "nearest" and not np.allclose(fast, expected, atol=2e-3, rtol=0):
                # A sample within rounding error of halfway between two voxels may go either
                # way (ITK's own answer depends on its arithmetic); skip those.
                halfway = _halfway_samples(image, target)
                fast, expected = fast[~halfway], expected[~halfway]
            np.testing.assert_allclose(fast, expected, atol=2e-3, rtol=0)


def _halfway_samples(image: sitk.Image, grid: CanonicalGrid) -> np.ndarray:
    """(X, Y, Z) bool: grid voxels whose position in ``image`` is halfway between voxels."""
    reference = grid.reference_image()
    halfway = np.zeros(grid.shape, dtype=bool)
    for index in itertools.product(*map(range, grid.shape)):
        point = reference.TransformIndexToPhysicalPoint(index)
        c = np.array(image.TransformPhysicalPointToContinuousIndex(point))
        halfway[index] = np.any(np.abs(c - np.floor(c) - 0.5) < 1e-6)
    return halfway


def test_reindexing_keeps_every_voxel_at_its_world_position():
    from voxelfm.io.canonical import index_like_sar

    for direction in ORIENTATIONS:
        image = synthetic_ct(size=(5, 6, 7), spacing=(0.5, 0.75, 3.0), direction=direction)
        reindexed = index_like_sar(image)
        np.testing.assert_allclose(
            np.asarray(reindexed.GetDirection()).reshape(3, 3), np.diag([-1.0, -1.0, 1.0])[:, ::-1]
        )
        for index in itertools.product(*[(0, n - 1) for n in image.GetSize()]):
            point = image.TransformIndexToPhysicalPoint(index)
            assert image[index] == reindexed[reindexed.TransformPhysicalPointToIndex(point)]
