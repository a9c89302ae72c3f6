"""End-to-end checks of the synthetic cohort, read back with nibabel / SimpleITK only.

Cohorts here are small (few patients, ~30 voxels a side at ~1 cm) so the file runs in
seconds; the generator's code path is the same as for the demo cohort.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from lifelines.utils import concordance_index
from scipy import ndimage

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.synth import LABELS, generate_cohort

LESION_LABELS = [LABELS["lung_nodule"], LABELS["liver_lesion"]]
LIVER_LABELS = [LABELS["liver"], LABELS["liver_lesion"]]


def _generate(path: Path, **overrides) -> Path:
    arguments = {
        "n_patients": 8,
        "repeat_fraction": 0.5,
        "seed": 5,
        "dicom_fraction": 0.4,
        "shape_range": (28, 36),
        "spacing_range": (8.0, 11.0),
        "progress": False,
    }
    return generate_cohort(path, **{**arguments, **overrides})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("synth") / "cohort").parent


@pytest.fixture(scope="module")
def tables(cohort) -> pd.DataFrame:
    """manifest + labels + acquisitions, one row per scan."""
    manifest = pd.read_csv(cohort / "manifest.csv")
    labels = pd.read_csv(cohort / "labels.csv")
    acquisitions = pd.read_csv(cohort / "acquisitions.csv")
    return manifest.merge(labels, on=["scan_id", "patient_id"]).merge(
        acquisitions, on=["scan_id", "patient_id"]
    )


def _read_image(root: Path, relative: str) -> sitk.Image:
    """A NIfTI file or a DICOM series folder, as any SimpleITK user would read it."""
    path = root / relative
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".dcm"  # DICOM SOP instance UIDs are random per write
    }


def _dicom_pixels(folder: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(_read_image(folder, "."))


# --- layout ---------------------------------------------------------------------------------


def test_layout_and_columns(cohort, tables):
    labels = pd.read_csv(cohort / "labels.csv")
    assert list(pd.read_csv(cohort / "manifest.csv").columns) == [
        "scan_id",
        "patient_id",
        "image",
        "label_seg",
    ]
    assert {
        "scan_id",
        "patient_id",
        "finding",
        "target",
        "survival_time",
        "event",
        "lesion_x_mm",
        "lesion_y_mm",
        "lesion_z_mm",
        "n_lesions",
        "report",
        "split",
    } <= set(labels.columns)
    for _, row in tables.iterrows():
        assert (cohort / row.image).exists() and (cohort / row.label_seg).is_file()
        assert (cohort / row.image).is_dir() == (row.format == "dicom")
    assert set(tables.format) == {"nifti", "dicom"}
    label_names = json.loads((cohort / "label_names.json").read_text())
    assert {int(k) for k in label_names} == {0, *LABELS.values()}
    assert not [p for p in cohort.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_survival_and_split_are_per_patient(tables):
    per_patient = tables.groupby("patient_id")[["survival_time", "event", "split"]].nunique()
    assert (per_patient == 1).all().all()
    assert (tables.survival_time > 0).all() and set(tables.event) <= {0, 1}
    assert set(tables.split) <= {"train", "val", "test"}


def test_repeat_scans_for_the_repeat_fraction(tables):
    scans_per_patient = tables.groupby("patient_id").size()
    assert len(scans_per_patient) == 8
    assert (scans_per_patient == 2).sum() == 4  # round(0.5 * 8)
    for _, scans in tables.groupby("patient_id"):
        if len(scans) == 2:
            first, second = scans.iloc[0], scans.iloc[1]
            # Same anatomy seen through a different acquisition.
            assert (first.shape, first.spacing_mm) != (second.shape, second.spacing_mm)
            assert second.target == pytest.approx(first.target, rel=0.12)


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_same_files_other_seed_differs(tmp_path):
    tiny = {
        "n_patients": 3,
        "repeat_fraction": 0.34,
        "dicom_fraction": 0.25,
        "shape_range": (16, 20),
    }
    first = _generate(tmp_path / "a", **tiny).parent
    again = _generate(tmp_path / "b", **tiny).parent
    other = _generate(tmp_path / "c", **tiny, seed=6).parent

    assert _digest(first) == _digest(again)
    dicom_series = sorted((first / "dicom").iterdir())
    assert dicom_series
    for series in dicom_series:
        assert np.array_equal(_dicom_pixels(series), _dicom_pixels(again / "dicom" / series.name))

    assert (first / "labels.csv").read_bytes() != (other / "labels.csv").read_bytes()
    shared = set(_digest(first)) & set(_digest(other))
    assert any(_digest(first)[name] != _digest(other)[name] for name in shared if "images/" in name)


# --- image content --------------------------------------------------------------------------

# Median HU of each structure's voxels; wide enough for noise, contrast phase and blur.
HU_BOUNDS = {
    "lung_left": (-900, -700),
    "lung_right": (-900, -700),
    "liver": (15, 85),
    "spleen": (25, 75),
    "kidney_left": (10, 170),
    "kidney_right": (10, 170),
    "spine": (150, 750),
    "aorta": (20, 240),
    "heart": (20, 240),
}


def test_organ_hu_plausible_and_label_map_on_the_image_grid(cohort, tables):
    for _, row in tables.iterrows():
        image = _read_image(cohort, row.image)
        label_map = sitk.ReadImage(str(cohort / row.label_seg))
        # Same grid voxel for voxel, DICOM series included (as a DICOM reader stacks them).
        assert image.GetSize() == label_map.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), label_map.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), label_map.GetDirection(), atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), label_map.GetSpacing(), atol=1e-4)

        hu = sitk.GetArrayFromImage(image).astype(float)
        labels = sitk.GetArrayFromImage(label_map)
        assert hu.min() >= -1024 and hu.max() <= 3071
        for name, (low, high) in HU_BOUNDS.items():
            voxels = hu[labels == LABELS[name]]
            if voxels.size >= 5:
                assert low <= np.median(voxels) <= high, (row.scan_id, name, np.median(voxels))
        liver_lesion = hu[labels == LABELS["liver_lesion"]]
        if liver_lesion.size >= 5:
            assert np.median(liver_lesion) < np.median(hu[labels == LABELS["liver"]]) - 10


def test_lesion_centre_is_the_centroid_of_its_voxels_in_world_space(cohort, tables):
    with_lesion = tables[tables.n_lesions > 0]
    assert len(with_lesion) >= 3
    for _, row in with_lesion.iterrows():
        label_image = nib.load(cohort / row.label_seg)
        lesion_mask = np.isin(np.asarray(label_image.dataobj), LESION_LABELS)
        components, count = ndimage.label(lesion_mask)
        centroids_ijk = np.array(
            ndimage.center_of_mass(lesion_mask, components, range(1, count + 1))
        )
        centroids_world = nib.affines.apply_affine(label_image.affine, centroids_ijk)
        reported = row[["lesion_x_mm", "lesion_y_mm", "lesion_z_mm"]].to_numpy(float)
        voxel_size = np.linalg.norm(label_image.affine[:3, :3], axis=0).max()
        assert np.linalg.norm(centroids_world - reported, axis=1).min() < voxel_size, row.scan_id
    no_lesion = tables[tables.n_lesions == 0]
    assert no_lesion[["lesion_x_mm", "lesion_y_mm", "lesion_z_mm"]].isna().all().all()


def test_targets_are_measured_on_the_scan(cohort, tables):
    for _, row in tables.iterrows():
        label_image = nib.load(cohort / row.label_seg)
        labels = np.asarray(label_image.dataobj)
        voxel_ml = abs(np.linalg.det(label_image.affine[:3, :3])) / 1000.0
        assert row.target == pytest.approx(np.isin(labels, LIVER_LABELS).sum() * voxel_ml, abs=0.01)
        assert row.finding == int((labels == LABELS["liver_lesion"]).any())
        # Lesions are placed >= 12 mm apart, so at these voxel sizes each is one component.
        assert row.n_lesions == ndimage.label(np.isin(labels, LESION_LABELS))[1]
    assert 0 < tables.finding.mean() < 1
    assert tables.target.std() > 0.1 * tables.target.mean()  # organ size really varies


def test_reports_mention_exactly_the_findings_on_the_scan(cohort, tables):
    for _, row in tables.iterrows():
        labels = np.asarray(nib.load(cohort / row.label_seg).dataobj)
        report = row.report.lower()
        has_nodule = (labels == LABELS["lung_nodule"]).any()
        has_liver_lesion = (labels == LABELS["liver_lesion"]).any()
        assert ("nodule" in report) == has_nodule, row.report
        assert ("lesion" in report) == has_liver_lesion, row.report
        if has_nodule or has_liver_lesion:
            sizes = [int(size) for size in re.findall(r"(\d+) mm", report)]
            assert sizes and all(4 <= size <= 47 for size in sizes), row.report
        else:
            assert re.search(r"no acute|normal study|unremarkable examination", report) or (
                "steatosis" in report or "hepatomegaly" in report
            ), row.report
    assert tables.report.nunique() > len(tables) / 2  # wording varies


def test_orientation_spacing_and_encoding_vary(cohort, tables):
    axcodes, spacings = set(), set()
    for _, row in tables.iterrows():
        label_image = nib.load(cohort / row.label_seg)
        axcodes.add("".join(nib.aff2axcodes(label_image.affine)))
        spacings.add(tuple(np.round(label_image.header.get_zooms(), 2)))
        assert all(28 <= n <= 36 for n in label_image.shape)
    assert len(axcodes) >= 4
    assert len(spacings) == len(tables)
    assert any(max(s) > min(s) * 1.05 for s in spacings)  # anisotropic voxels occur
    nifti_dtypes = {
        str(nib.load(cohort / row.image).get_data_dtype())
        for _, row in tables[tables.format == "nifti"].iterrows()
    }
    assert len(nifti_dtypes) >= 2


# --- survival signal ------------------------------------------------------------------------


def test_survival_depends_on_what_the_image_shows(tmp_path):
    root = _generate(
        tmp_path / "survival",
        n_patients=100,
        repeat_fraction=0.0,
        dicom_fraction=0.0,
        shape_range=(12, 16),
        spacing_range=(20.0, 28.0),
        seed=11,
    ).parent
    patients = pd.read_csv(root / "patients.csv")
    assert 0.3 < patients.event.mean() < 0.95
    ground_truth = concordance_index(patients.survival_time, -patients.log_hazard, patients.event)
    assert ground_truth > 0.65

    # The same covariates measured on the images alone (lesion volume, liver attenuation).
    manifest = pd.read_csv(root / "manifest.csv").merge(pd.read_csv(root / "labels.csv"))
    measured_risk = []
    for _, row in manifest.iterrows():
        hu = nib.load(root / row.image).get_fdata()
        label_image = nib.load(root / row.label_seg)
        labels = np.asarray(label_image.dataobj)
        voxel_ml = abs(np.linalg.det(label_image.affine[:3, :3])) / 1000.0
        lesion_ml = np.isin(labels, LESION_LABELS).sum() * voxel_ml
        measured_risk.append(np.log1p(lesion_ml) - np.median(hu[labels == LABELS["liver"]]) / 20.0)
    assert concordance_index(manifest.survival_time, -np.array(measured_risk), manifest.event) > 0.6


# --- safety ---------------------------------------------------------------------------------


def test_refuses_to_replace_a_folder_that_is_not_a_cohort(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(InputError):
        _generate(precious, n_patients=1)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_regenerating_replaces_a_previous_cohort(tmp_path):
    out = tmp_path / "cohort"
    _generate(out, n_patients=1, shape_range=(12, 12))
    _generate(out, n_patients=2, shape_range=(12, 12), repeat_fraction=0.0)
    assert len(pd.read_csv(out / "manifest.csv")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"]


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    import voxelfm.synth.cohort as cohort_module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cohort_module, "write_report", fail)
    with pytest.raises(KeyboardInterrupt):
        _generate(tmp_path / "cohort", n_patients=1, shape_range=(12, 12))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"n_patients": 0},
        {"repeat_fraction": 1.5},
        {"shape_range": (40, 20)},
        {"spacing_range": (0, 2)},
    ],
)
def test_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(VoxelFMError):
        _generate(tmp_path / "cohort", **bad)
