"""Unit checks of the synthetic-cohort building blocks: geometry, rendering, files, reports."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from voxelfm.synth import LABELS, draw_scan_plan, make_phantom, render_scan
from voxelfm.synth.anatomy import Lesion
from voxelfm.synth.geometry import PatientPose, grid_geometry
from voxelfm.synth.outcomes import VisibleLesion
from voxelfm.synth.render import Acquisition
from voxelfm.synth.report import write_report
from voxelfm.synth.shapes import Ellipsoid
from voxelfm.synth.writers import dicom_reading_order, save_dicom, save_nifti

QUIET = Acquisition(
    noise_sd=1.0, contrast=0.5, psf_sigma_voxels=0.5, lesion_growth=1.0, noise_seed=0
)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(np.random.default_rng(3), "p")


def _still_pose() -> PatientPose:
    return PatientPose(rotation=np.eye(3), translation=np.zeros(3))


def test_the_same_anatomy_on_two_unrelated_grids(phantom):
    """World-space sampling: another orientation, spacing and obliquity shows the same organs."""
    pose = _still_pose()
    plain = grid_geometry("RAS", np.array([80, 60, 80]), np.full(3, 4.0), np.array([0, 0, -20.0]))
    other = grid_geometry(
        "PLI",
        np.array([70, 55, 60]),
        np.array([4.6, 4.6, 5.3]),
        np.array([5.0, -3, -15]),
        tilt=Rotation.from_rotvec([0.03, 0.02, 0.17]).as_matrix(),
    )
    labels_plain = render_scan(phantom, plain, pose, QUIET).labels
    labels_other = render_scan(phantom, other, pose, QUIET).labels
    for name in ("liver", "lung_right", "lung_left", "spleen"):
        core = ndimage.binary_erosion(labels_plain == LABELS[name], iterations=2)
        world = plain.index_to_world(np.argwhere(core))
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(other.affine), world)).astype(int)
        on_grid = np.all((ijk >= 0) & (ijk < other.shape), axis=1)
        assert on_grid.sum() > 100
        agree = labels_other[tuple(ijk[on_grid].T)] == LABELS[name]
        assert agree.mean() > 0.97, name


def test_patient_left_and_right_follow_ras(phantom):
    geometry = grid_geometry("LPI", np.array([90, 70, 80]), np.full(3, 4.0), np.zeros(3))
    rendered = render_scan(phantom, geometry, _still_pose(), QUIET)

    def centroid(name):
        return geometry.index_to_world(np.argwhere(rendered.labels == LABELS[name]).mean(axis=0))

    assert centroid("liver")[0] > 0 > centroid("spleen")[0]  # RAS: +x is the patient's right
    assert centroid("lung_right")[0] > centroid("lung_left")[0]
    assert centroid("heart")[1] > centroid("spine")[1]  # +y anterior
    assert centroid("lung_right")[2] > centroid("kidney_right")[2]  # +z superior


def test_lesions_sit_inside_their_organ_and_name_their_side():
    phantoms = [make_phantom(np.random.default_rng(seed), "p") for seed in range(12)]
    lesions = [lesion for p in phantoms for lesion in p.lesions]
    assert {lesion.kind for lesion in lesions} == {"lung_nodule", "liver_lesion"}
    for p in phantoms:
        for lesion in p.lesions:
            organ = p.labels_at((1, 1, 1), _translation(lesion.shape.centre))[0, 0, 0]
            if lesion.kind == "liver_lesion":
                assert organ == LABELS["liver"] and lesion.location.startswith("segment")
            else:
                side = "right" if organ == LABELS["lung_right"] else "left"
                assert organ in (LABELS["lung_right"], LABELS["lung_left"])
                assert lesion.location.startswith(side)


def _translation(point: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = point
    return affine


def test_scan_plans_respect_ranges_and_keep_liver_and_lesions_in_view(phantom):
    rng = np.random.default_rng(0)
    plans = [
        draw_scan_plan(
            rng,
            phantom,
            scan_format=fmt,
            baseline=False,
            shape_range=(56, 72),
            spacing_range=(5.0, 7.0),
        )
        for fmt in ("nifti", "dicom")
        for _ in range(30)
    ]
    for plan in plans:
        geometry = plan.geometry
        assert all(56 <= n <= 72 for n in geometry.shape)
        assert np.all((geometry.spacing > 5.0 - 1e-9) & (geometry.spacing < 7.0 + 1e-9))
        low, high = phantom.liver_and_lesion_bounds(plan.acquisition.lesion_growth)
        corners = plan.pose.to_world(np.array(list(itertools.product(*zip(low, high)))))
        ijk = nib.affines.apply_affine(np.linalg.inv(geometry.affine), corners)
        assert np.all(ijk > -0.5) and np.all(ijk < np.array(geometry.shape) - 0.5)
        if plan.scan_format == "dicom":
            assert geometry.axcodes[2] in "SI"  # an axial stack
    dicom = [p for p in plans if p.scan_format == "dicom"]
    assert 0.15 < np.mean([p.oblique_deg > 0 for p in dicom]) < 0.7
    assert len({p.geometry.axcodes for p in plans if p.scan_format == "nifti"}) >= 5


@pytest.mark.parametrize("encoding", ["int16", "float32", "uint16"])
def test_nifti_round_trip(tmp_path, encoding):
    hu = np.random.default_rng(0).integers(-1024, 3072, size=(6, 5, 4)).astype(np.int16)
    geometry = grid_geometry("PLI", np.array([6, 5, 4]), np.array([2.0, 3.0, 4.0]), np.ones(3))
    path = tmp_path / "scan.nii.gz"
    save_nifti(hu, geometry, path, encoding=encoding)
    image = nib.load(path)
    assert np.array_equal(image.get_fdata(), hu)
    np.testing.assert_allclose(image.affine, geometry.affine, atol=1e-5)
    np.testing.assert_allclose(image.get_qform(), geometry.affine, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["scan.nii.gz"]


@pytest.mark.parametrize(
    "axcodes, rescale", [("LPS", (1.0, -1024.0)), ("LPI", (2.0, -3024.0)), ("RPS", (0.5, -1024.0))]
)
def test_dicom_series_reads_back_on_the_label_grid(tmp_path, axcodes, rescale):
    shape = np.array([7, 6, 5])
    hu = np.random.default_rng(1).integers(-1024, 3072, size=tuple(shape)).astype(np.int16)
    tilt = Rotation.from_rotvec([0.12, 0.06, 0.0]).as_matrix()  # oblique by ~7.7 degrees
    geometry = grid_geometry(
        axcodes, shape, np.array([1.5, 1.5, 3.0]), np.array([10, -5, 30]), tilt
    )
    save_dicom(hu, geometry, tmp_path / "series", rescale=rescale, patient_id="p", uid_seed="x")
    label_path = tmp_path / "labels.nii.gz"
    expected_hu, label_geometry = dicom_reading_order(hu, geometry)
    save_nifti(expected_hu, label_geometry, label_path, encoding="int16")

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    series = reader.Execute()
    labels = sitk.ReadImage(str(label_path))
    np.testing.assert_allclose(series.GetOrigin(), labels.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(series.GetDirection(), labels.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(series.GetSpacing(), labels.GetSpacing(), atol=1e-5)
    difference = sitk.GetArrayFromImage(series) - sitk.GetArrayFromImage(labels).astype(float)
    assert np.abs(difference).max() <= rescale[0] / 2.0  # only the slope's rounding


def _visible(kind: str, diameter: float, location: str) -> VisibleLesion:
    shape = Ellipsoid(np.zeros(3), np.full(3, diameter / 2.0))
    lesion = Lesion(kind=kind, shape=shape, hu=30.0, location=location)
    return VisibleLesion(lesion, diameter, lesion.volume_ml(), np.zeros(3), voxels=10)


def test_reports_state_sizes_and_places():
    rng = np.random.default_rng(0)
    nodule = _visible("lung_nodule", 8.4, "right upper lobe")
    liver_lesion = _visible("liver_lesion", 23.0, "segment VII")
    for _ in range(10):
        report = write_report(rng, [nodule, liver_lesion], liver_hu=60.0, liver_volume_ml=1500.0)
        assert "8 mm" in report and "right upper lobe" in report.lower() and "nodule" in report
        assert "23 mm" in report and "segment VII" in report and "lesion" in report
        assert " a 8 mm" not in report.lower()


def test_normal_reports_name_no_finding_but_do_name_steatosis():
    rng = np.random.default_rng(0)
    normal = {write_report(rng, [], liver_hu=60.0, liver_volume_ml=1400.0) for _ in range(30)}
    assert len(normal) > 5
    for report in normal:
        assert "nodule" not in report and "lesion" not in report and "steatosis" not in report
        assert "IMPRESSION: " in report
    fatty = write_report(rng, [], liver_hu=30.0, liver_volume_ml=2600.0)
    assert "Hepatic steatosis." in fatty and "Hepatomegaly." in fatty
