"""Readers and canonicalisation on the real CT folder (skipped when it is absent).

Independent references: nibabel (NIfTI affines, as_closest_canonical), SimpleITK's own
series reader and DICOMOrient, pydicom's stored pixel values, scipy's trilinear sampling.
"""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.ndimage import center_of_mass, map_coordinates

from voxelfm.conventions import HU_MAX, HU_MIN
from voxelfm.io.preprocess import preprocess_scan
from voxelfm.io.readers import read_image

pytestmark = pytest.mark.realdata

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])

# name -> (image path, expected axcodes, label name -> label path), relative to the data folder
CASES = {
    "openkbp": (
        "openkbp/openkbp_train_pt_1/ct.nii.gz",
        "PLI",
        {"oars": "openkbp/openkbp_train_pt_1/oars.nii.gz"},
    ),
    "ibsi": ("ibsi_sts/STS_001/ct.nii.gz", "LPS", {"gtv": "ibsi_sts/STS_001/gtv.nii.gz"}),
    "totalseg": (
        "totalseg/example_ct.nii.gz",
        "RAS",
        {"seg": "totalseg/example_seg_fast_force_split.nii.gz"},
    ),
    "totalseg_dicom": (
        "totalseg/example_ct_dicom",
        "LPS",
        {"seg": "totalseg/example_seg_dicom.nii.gz"},
    ),
    "dcmqi": (
        "dicom/dcmqi_abdomen_3slice",
        "LPS",
        {"liver": "dicom/dcmqi_abdomen_3slice/liver_seg.nrrd"},
    ),
    "slicer_head": ("dicom/slicer_head_ct", "LPS", {}),
}
NIFTI_CASES = ["openkbp", "ibsi", "totalseg"]
LABELLED_CASES = [name for name, case in CASES.items() if case[2]]


@functools.cache
def _preprocessed(root: str, name: str, native: bool):
    image, _, labels = CASES[name]
    return preprocess_scan(
        f"{root}/{image}",
        {key: f"{root}/{path}" for key, path in labels.items()},
        **({"spacing": None} if native else {}),
    )


@pytest.fixture
def preprocessed(real_data):
    return lambda name, native=True: _preprocessed(str(real_data), name, native)


def _sitk_reading(path) -> sitk.Image:
    """SimpleITK on its own: ImageFileReader, or the GDCM-sorted series reader."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _centroids_ras(labels: np.ndarray, affine: np.ndarray) -> dict[int, np.ndarray]:
    """RAS mm centroid of each label value, from an index->RAS affine."""
    values = np.unique(labels)[1:]
    centres = center_of_mass(labels > 0, labels, values)
    return {int(v): nib.affines.apply_affine(affine, c) for v, c in zip(values, centres)}


def _sitk_ras_affine(image: sitk.Image) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = (
        LPS_TO_RAS[:, None] * np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing()
    )
    affine[:3, 3] = LPS_TO_RAS * image.GetOrigin()
    return affine


@pytest.mark.parametrize("name", NIFTI_CASES)
def test_nifti_matches_nibabel_closest_canonical(real_data, preprocessed, name):
    source = nib.load(real_data / CASES[name][0])
    expected = nib.as_closest_canonical(source)
    volume = preprocessed(name)
    assert (
        volume.meta["original_axcodes"] == "".join(nib.aff2axcodes(source.affine)) == CASES[name][1]
    )
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-3)
    hu = np.clip(np.rint(expected.get_fdata()), HU_MIN, HU_MAX)
    np.testing.assert_array_equal(volume.image, hu)


@pytest.mark.parametrize("name", list(CASES))
def test_voxels_keep_their_world_position_and_hu(real_data, preprocessed, name):
    """Source voxel (i, j, k) at SimpleITK's world point p must hold the same HU in the
    canonical volume at p, and SimpleITK's DICOMOrient to RAS must give the same array."""
    source = _sitk_reading(real_data / CASES[name][0])
    volume = preprocessed(name)
    source_hu = sitk.GetArrayFromImage(source)  # (k, j, i)
    rng = np.random.default_rng(0)
    for index in rng.integers(0, source.GetSize(), size=(50, 3)):
        world = LPS_TO_RAS * np.array(source.TransformIndexToPhysicalPoint(index.tolist()))
        canonical_index = volume.world_to_voxel(world)
        np.testing.assert_allclose(canonical_index, np.round(canonical_index), atol=1e-3)
        expected = np.clip(source_hu[tuple(index[::-1])], HU_MIN, HU_MAX)
        assert volume.image[tuple(np.round(canonical_index).astype(int))] == expected
    reoriented = sitk.GetArrayFromImage(sitk.DICOMOrient(source, "RAS")).transpose(2, 1, 0)
    np.testing.assert_array_equal(volume.image, np.clip(reoriented, HU_MIN, HU_MAX))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["openkbp", "totalseg"])  # coarser than 1.5 mm: no antialiasing
def test_1p5mm_grid_spacing_extent_and_trilinear_hu(real_data, preprocessed, name):
    source = nib.load(real_data / CASES[name][0])
    volume = preprocessed(name, native=False)
    spacing = np.array(volume.spacing)
    assert volume.spacing == (1.5, 1.5, 1.5)
    # Extent: the grid's voxel edges enclose the source's, with less than a voxel to spare.
    edges = (
        np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in source.shape], indexing="ij"))
        .reshape(3, -1)
        .T
    )
    corners = nib.affines.apply_affine(source.affine, edges)
    grid_low = np.array(volume.origin) - spacing / 2
    grid_high = grid_low + np.array(volume.image.shape) * spacing
    assert np.all(grid_low <= corners.min(axis=0) + 1e-3) and np.all(
        grid_high >= corners.max(axis=0) - 1e-3
    )
    assert np.all(grid_high - grid_low - (corners.max(axis=0) - corners.min(axis=0)) < spacing)
    # HU: trilinear interpolation of the source by scipy at the canonical voxel centres.
    rng = np.random.default_rng(1)
    canonical_index = rng.integers(0, volume.image.shape, size=(2000, 3))
    source_index = nib.affines.apply_affine(
        np.linalg.inv(source.affine), volume.voxel_to_world(canonical_index)
    )
    inside = np.all((source_index >= 0) & (source_index <= np.array(source.shape) - 1), axis=1)
    expected = map_coordinates(source.get_fdata(), source_index[inside].T, order=1)
    actual = volume.image[tuple(canonical_index[inside].T)]
    np.testing.assert_allclose(actual, np.clip(expected, HU_MIN, HU_MAX), atol=0.51)


@pytest.mark.parametrize(
    "native", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["native", "1p5mm"]
)
@pytest.mark.parametrize("name", LABELLED_CASES)
def test_label_centroids_stay_put(real_data, preprocessed, name, native):
    """Each label's RAS centroid from the label file (SimpleITK geometry) equals the
    centroid from the canonical label map: exactly at native spacing. At 1.5 mm nearest
    neighbour moves a thin structure's boundary by up to half a voxel of the coarser grid,
    so each label must stay within one such voxel and all labels' foreground together
    within a quarter (a systematic half-voxel grid shift would break that)."""
    label_name, label_path = next(iter(CASES[name][2].items()))
    label = sitk.ReadImage(str(real_data / label_path))
    source_labels = sitk.GetArrayFromImage(label).transpose(2, 1, 0)
    volume = preprocessed(name, native)
    expected = _centroids_ras(source_labels, _sitk_ras_affine(label))
    actual = _centroids_ras(volume.labels[label_name], volume.affine)
    assert actual.keys() == expected.keys()
    if native:
        for value in expected:
            np.testing.assert_allclose(actual[value], expected[value], atol=1e-3)
        return
    coarser = np.maximum(np.abs(_sitk_ras_affine(label)[:3, :3]).max(axis=1), volume.spacing)
    for value in expected:
        np.testing.assert_array_less(np.abs(actual[value] - expected[value]), coarser)
    foreground_shift = (
        _centroids_ras((volume.labels[label_name] > 0).astype(np.uint8), volume.affine)[1]
        - _centroids_ras((source_labels > 0).astype(np.uint8), _sitk_ras_affine(label))[1]
    )
    np.testing.assert_array_less(np.abs(foreground_shift), coarser / 4)


def test_openkbp_labels_match_nibabel_centroids(real_data, preprocessed):
    oars = nib.load(real_data / CASES["openkbp"][2]["oars"])
    expected = _centroids_ras(np.asarray(oars.dataobj), oars.affine)
    volume = preprocessed("openkbp")
    actual = _centroids_ras(volume.labels["oars"], volume.affine)
    assert sorted(actual) == sorted(expected) and len(expected) >= 5
    for value in expected:
        np.testing.assert_allclose(actual[value], expected[value], atol=1e-3)


def test_dcmqi_liver_and_spine_labels_sit_on_liver_and_bone(real_data):
    folder = real_data / "dicom/dcmqi_abdomen_3slice"
    volume = preprocess_scan(
        folder, {"liver": folder / "liver_seg.nrrd", "spine": folder / "spine_seg.nrrd"}
    )
    liver_hu = volume.image[volume.labels["liver"] == 1].mean()
    spine_hu = volume.image[volume.labels["spine"] == 2].mean()
    assert 0 < liver_hu < 150 and spine_hu > 200


def _pydicom_slices(folder) -> dict[float, tuple[np.ndarray, float, float]]:
    """z position -> (stored pixels (rows, columns), slope, intercept) of each slice."""
    slices = {}
    for file in folder.iterdir():
        if file.suffix == ".nrrd":
            continue
        dataset = pydicom.dcmread(file)
        z = float(dataset.ImagePositionPatient[2])
        slices[z] = (
            dataset.pixel_array,
            float(dataset.RescaleSlope),
            float(dataset.RescaleIntercept),
        )
    return slices


@pytest.mark.parametrize("name", ["slicer_head", "dcmqi"])
def test_dicom_hu_are_stored_times_slope_plus_intercept(real_data, name):
    folder = real_data / CASES[name][0]
    image, _ = read_image(folder)
    hu = sitk.GetArrayFromImage(image)  # (k, rows, columns)
    slices = _pydicom_slices(folder)
    assert len(slices) == hu.shape[0]
    for k in range(hu.shape[0]):
        z = image.TransformIndexToPhysicalPoint((0, 0, k))[2]
        stored, slope, intercept = slices[min(slices, key=lambda s: abs(s - z))]
        np.testing.assert_array_equal(hu[k], stored * slope + intercept)


def test_slicer_head_has_no_hu_offset_and_is_flagged(real_data, preprocessed):
    """The Slicer head stores air near 0 with RescaleIntercept 0: the reader must not invent
    a -1024 offset, and the missing air is reported."""
    folder = real_data / CASES["slicer_head"][0]
    slices = _pydicom_slices(folder)
    assert {(slope, intercept) for _, slope, intercept in slices.values()} == {(1.0, 0.0)}
    volume = preprocessed("slicer_head")
    assert volume.image.min() == 0
    assert np.percentile(volume.image, 5) == 0  # air outside the head, stored as 0
    assert any("no voxel below" in w for w in volume.meta["warnings"])


def test_dcmqi_padding_becomes_air(real_data, preprocessed):
    folder = real_data / CASES["dcmqi"][0]
    source = sitk.GetArrayFromImage(_sitk_reading(folder))
    assert source.min() == -3024
    volume = preprocessed("dcmqi")
    reoriented = sitk.GetArrayFromImage(sitk.DICOMOrient(_sitk_reading(folder), "RAS")).transpose(
        2, 1, 0
    )
    padded = reoriented == -3024
    assert padded.sum() > 1000
    assert np.all(volume.image[padded] == HU_MIN)
