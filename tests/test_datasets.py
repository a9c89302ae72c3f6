"""Dataset adapters on tiny fake trees in each dataset's own layout (and the real CT folder)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from voxelfm.cli import main
from voxelfm.datasets import ADAPTERS, adapt_dataset
from voxelfm.datasets.common import label_statistics, lps_to_ras
from voxelfm.datasets.ctrate import ABNORMALITIES, LABEL_COLUMNS
from voxelfm.datasets.osic import visit_targets
from voxelfm.errors import InputError, VoxelFMError
from voxelfm.evaluation.tasks import EvaluationTask
from voxelfm.ingest.manifest import read_manifest
from voxelfm.io.dicom_write import write_dicom_series
from voxelfm.io.geometry import ras_affine
from voxelfm.splits import check_patient_level_split


def _nifti(path: Path, shape=(4, 4, 3), affine=None, data=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(shape, np.int16) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def _dicom(folder: Path, modality: str = "CT", n_slices: int = 3) -> None:
    image = sitk.Image(4, 4, n_slices, sitk.sitkFloat32)
    write_dicom_series(image, folder, modality=modality)


def _write_csv(path: Path, rows: list[dict], sep: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False, sep=sep)


def _check_outputs(result, n_scans: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Manifest validates strictly, labels align, split is patient-level, tasks parse."""
    manifest = read_manifest(result.manifest, strict=True)
    labels = pd.read_csv(result.labels, dtype={"scan_id": str, "patient_id": str})
    info = json.loads(result.info.read_text())
    assert len(manifest) == len(labels) == n_scans == info["counts"]["scans"]
    assert list(manifest["scan_id"]) == list(labels["scan_id"])
    assert set(labels["split"]) <= {"train", "val", "test"}
    check_patient_level_split(labels["patient_id"], labels["split"])
    for name, spec in info["tasks"].items():
        task = EvaluationTask.from_config(name, spec)
        assert set(task.labels) <= set(labels.columns)
    return manifest, labels, info


def _one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- CT-RATE --------------------------------------------------------------------------------

CTRATE_VOLUMES = {
    "train": [
        "train_1_a_1",
        "train_1_a_2",
        "train_1_b_1",
        "train_2_a_1",
        "train_3_a_1",
        "train_4_a_1",
        "train_5_a_1",
    ],
    "valid": ["valid_1_a_1", "valid_2_a_1", "valid_2_a_2"],
}


def _ctrate_tree(root: Path) -> Path:
    dataset = root / "dataset"
    for official, names in CTRATE_VOLUMES.items():
        prefix = "valid" if official == "valid" else "train"
        long = "validation" if official == "valid" else "train"
        for k, name in enumerate(names):
            patient, study = "_".join(name.split("_")[:2]), "_".join(name.split("_")[:3])
            _nifti(dataset / official / patient / study / f"{name}.nii.gz")
        volume_names = [f"{n}.nii.gz" for n in names]
        _write_csv(
            dataset / "multi_abnormality_labels" / f"{prefix}_predicted_labels.csv",
            [
                {"VolumeName": v, **{a: (k + j) % 2 for j, a in enumerate(ABNORMALITIES)}}
                for k, v in enumerate(volume_names)
            ],
        )
        _write_csv(
            dataset / "radiology_text_reports" / f"{long}_reports.csv",
            [
                {
                    "VolumeName": v,
                    "ClinicalInformation_EN": "",
                    "Technique_EN": "",
                    "Findings_EN": f"findings of {v}",
                    "Impressions_EN": "normal",
                }
                for v in volume_names
            ],
        )
        _write_csv(
            dataset / "metadata" / f"{long}_metadata.csv",
            [
                {
                    "VolumeName": v,
                    "RescaleSlope": 1.0,
                    "RescaleIntercept": -1024.0,
                    "XYSpacing": "[0.75, 0.75]",
                    "ZSpacing": 1.5,
                }
                for v in volume_names
            ],
        )
    return root


def test_ctrate(tmp_path):
    root = _ctrate_tree(tmp_path / "CT-RATE")
    result = adapt_dataset("ctrate", root, tmp_path / "out", seed=3)
    manifest, labels, info = _check_outputs(result, 10)
    assert labels.loc[labels["scan_id"].str.startswith("valid"), "split"].eq("test").all()
    train_part = labels[labels["scan_id"].str.startswith("train")]
    assert set(train_part["split"]) == {"train", "val"}
    row = labels.set_index("scan_id").loc["train_1_b_1"]
    assert row["patient_id"] == "train_1" and row["study"] == "train_1_b"
    assert row["report"] == "findings of train_1_b_1.nii.gz"
    # Row k=2 of the train CSV: column j holds (2 + j) % 2.
    assert [row[c] for c in LABEL_COLUMNS] == [j % 2 for j in range(18)]
    assert manifest["rescale_intercept"].astype(float).eq(-1024).all()
    assert manifest["xy_spacing_mm"].astype(float).eq(0.75).all()
    assert len(info["tasks"]["ctrate_abnormalities"]["labels"]) == 18
    first = adapt_dataset("ctrate", root, tmp_path / "out2", seed=3, reconstructions="first")
    assert first.n_scans == 8


def test_ctrate_malformed(tmp_path):
    root = _ctrate_tree(tmp_path / "CT-RATE")
    labels_csv = root / "dataset/multi_abnormality_labels/train_predicted_labels.csv"
    table = pd.read_csv(labels_csv).drop(columns="Cardiomegaly")
    table.to_csv(labels_csv, index=False)
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("ctrate", root, tmp_path / "out")
    _one_line_error(excinfo, "expected", "Cardiomegaly", str(labels_csv))
    labels_csv.unlink()
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("ctrate", root, tmp_path / "out")
    _one_line_error(excinfo, "expected CT-RATE abnormality labels", "train_predicted_labels.csv")
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("ctrate", tmp_path / "empty_is_missing", tmp_path / "out")
    (tmp_path / "empty" / "dataset" / "train").mkdir(parents=True)
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("ctrate", tmp_path / "empty", tmp_path / "out")
    _one_line_error(excinfo, "expected CT-RATE volumes", "train_1_a_1.nii.gz")
    assert not (tmp_path / "out" / "dataset.json").exists()


# --- RSNA PE --------------------------------------------------------------------------------


def _rsna_tree(root: Path, exams: dict[str, tuple[int, int, int]]) -> Path:
    """exams: study -> (negative_exam_for_pe, indeterminate, pe_on_any_image)."""
    rows = []
    for k, (study, (negative, indeterminate, pe_image)) in enumerate(exams.items()):
        series = f"se{k:03d}"
        _dicom(root / "train" / study / series)
        for image in range(3):
            rows.append(
                {
                    "StudyInstanceUID": study,
                    "SeriesInstanceUID": series,
                    "SOPInstanceUID": f"{series}i{image}",
                    "pe_present_on_image": int(pe_image and image == 1),
                    "negative_exam_for_pe": negative,
                    "qa_motion": 0,
                    "qa_contrast": 0,
                    "flow_artifact": 0,
                    "rv_lv_ratio_gte_1": int(not negative and k % 2 == 0),
                    "rv_lv_ratio_lt_1": int(not negative and k % 2 == 1),
                    "leftsided_pe": 0,
                    "chronic_pe": 0,
                    "true_filling_defect_not_pe": 0,
                    "rightsided_pe": 1 - negative,
                    "acute_and_chronic_pe": 0,
                    "central_pe": 0,
                    "indeterminate": indeterminate,
                }
            )
    _write_csv(root / "train.csv", rows)
    return root


def test_rsna_pe(tmp_path):
    exams = {f"st{k:03d}": (k % 2, 0, 1 - k % 2) for k in range(10)}
    exams["st100"] = (0, 1, 0)  # indeterminate
    root = _rsna_tree(tmp_path / "rsna", exams)
    _, labels, info = _check_outputs(adapt_dataset("rsna_pe", root, tmp_path / "out"), 11)
    by_study = labels.set_index("patient_id")
    assert by_study.loc["st000", "pe_present"] == 1 and by_study.loc["st001", "pe_present"] == 0
    assert np.isnan(by_study.loc["st100", "pe_present"])
    assert np.isnan(by_study.loc["st001", "rv_lv_ratio_gte_1"])  # negative exam: not given
    assert by_study.loc["st000", "rv_lv_ratio_gte_1"] == 1
    assert (by_study["n_images"] == 3).all()
    assert info["counts"]["patients"] == 11


def test_rsna_pe_inconsistent(tmp_path):
    root = _rsna_tree(tmp_path / "rsna", {"st0": (1, 0, 1), "st1": (0, 0, 1)})
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("rsna_pe", root, tmp_path / "out")
    _one_line_error(excinfo, "negative_exam_for_pe=1", "max(pe_present_on_image)=1")
    (root / "train.csv").unlink()
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("rsna_pe", root, tmp_path / "out")
    _one_line_error(excinfo, "expected the RSNA-PE image table", "train.csv")


# --- NSCLC-Radiomics ------------------------------------------------------------------------


def test_nsclc_radiomics(tmp_path):
    root = tmp_path / "tcia"
    rows = []
    for k in range(1, 11):
        patient = f"LUNG1-{k:03d}"
        study = root / "NSCLC-Radiomics" / patient / "01-01-2000-StudyID-1"
        _dicom(study / "0.000000-CT-1", "CT", 3)
        _dicom(study / "1.000000-RTSTRUCT-2", "RTSTRUCT", 5)  # more files, wrong modality
        rows.append(
            {
                "PatientID": patient,
                "age": 60 + k,
                "clinical.T.Stage": 2,
                "Clinical.N.Stage": 0,
                "Clinical.M.Stage": 0,
                "Overall.Stage": "IIIa",
                "Histology": "adenocarcinoma",
                "gender": "male",
                "Survival.time": 100 * k,
                "deadstatus.event": k % 2,
            }
        )
    _write_csv(root / "NSCLC-Radiomics-Lung1.clinical-version3-Oct-2019.csv", rows)
    manifest, labels, _ = _check_outputs(
        adapt_dataset("nsclc_radiomics", root, tmp_path / "out"), 10
    )
    assert manifest["image"].str.endswith("0.000000-CT-1").all()
    row = labels.set_index("scan_id").loc["LUNG1-004"]
    assert row["survival_time_days"] == 400 and row["event"] == 0 and row["age"] == 64
    for patient in (root / "NSCLC-Radiomics").iterdir():
        for series in patient.glob("*/0.000000-CT-1"):
            for file in series.iterdir():
                file.unlink()
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("nsclc_radiomics", root, tmp_path / "out")
    _one_line_error(excinfo, "expected Lung1 patients with a CT series")


# --- OSIC -----------------------------------------------------------------------------------


def test_osic_visit_targets():
    weeks, fvc = np.array([-4, 2, 10]), np.array([3000.0, 2900.0, 2700.0])
    targets = visit_targets(weeks, fvc, np.array([70.0, 68.0, 63.0]))
    assert targets["fvc_baseline_ml"] == 2900 and targets["percent_baseline"] == 68
    # Least squares by hand: slope = sum((w - mean w)(f - mean f)) / sum((w - mean w)^2).
    w, f = weeks - weeks.mean(), fvc - fvc.mean()
    assert targets["fvc_slope_ml_per_week"] == pytest.approx((w * f).sum() / (w * w).sum())
    tie = visit_targets(np.array([3, -3]), np.array([2000.0, 2100.0]), np.array([1.0, 2.0]))
    assert tie["fvc_baseline_ml"] == 2100  # equally close: the earlier visit
    assert np.isnan(
        visit_targets(np.array([5]), np.array([1.0]), np.array([1.0]))["fvc_slope_ml_per_week"]
    )


def _osic_tree(root: Path, n: int = 10) -> Path:
    rows = []
    for k in range(n):
        patient = f"ID{k:05d}"
        folder = root / "train" / patient
        folder.mkdir(parents=True)
        write_dicom_series(sitk.Image(4, 4, 2, sitk.sitkFloat32), folder / "tmp")
        for i, file in enumerate(sorted((folder / "tmp").iterdir()), start=1):
            file.rename(folder / f"{i}.dcm")
        (folder / "tmp").rmdir()
        for week in (0, 5 + k, 20):
            rows.append(
                {
                    "Patient": patient,
                    "Weeks": week,
                    "FVC": 3000 - 10 * week * (k + 1),
                    "Percent": 70.0,
                    "Age": 60,
                    "Sex": "Male",
                    "SmokingStatus": "Ex-smoker",
                }
            )
    _write_csv(root / "train.csv", rows)
    return root


def test_osic(tmp_path):
    root = _osic_tree(tmp_path / "osic")
    _, labels, _ = _check_outputs(adapt_dataset("osic", root, tmp_path / "out", seed=1), 10)
    row = labels.set_index("scan_id").loc["ID00003"]
    assert row["fvc_baseline_ml"] == 3000
    assert row["fvc_slope_ml_per_week"] == pytest.approx(-40.0)  # exactly linear visits
    table = pd.read_csv(root / "train.csv").drop(columns="FVC")
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("osic", root, tmp_path / "out")
    _one_line_error(excinfo, "expected the OSIC visit table with column(s) FVC")


# --- LUNA16 ---------------------------------------------------------------------------------


def test_lps_to_ras():
    assert lps_to_ras([10.0, -20.0, 30.0]).tolist() == [-10.0, 20.0, 30.0]


def test_luna16(tmp_path):
    root = tmp_path / "luna16"
    rows, expected_ras = [], {}
    for subset in (0, 7, 8):
        for k in range(2):
            uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{subset}{k}"
            image = sitk.Image(8, 9, 10, sitk.sitkInt16)
            image.SetSpacing((0.7, 0.8, 2.5))
            image.SetOrigin((-150.0 + subset, -170.0, -300.0))
            # A flipped direction: the ITK (LPS) world is not the index grid.
            image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
            (root / f"subset{subset}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(root / f"subset{subset}" / f"{uid}.mhd"))
            if k == 0:  # two nodules; the largest is at voxel (2, 3, 4)
                for index, diameter in (((2, 3, 4), 12.0), ((6, 6, 6), 4.0)):
                    lps = image.TransformIndexToPhysicalPoint(index)
                    rows.append(
                        {
                            "seriesuid": uid,
                            "coordX": lps[0],
                            "coordY": lps[1],
                            "coordZ": lps[2],
                            "diameter_mm": diameter,
                        }
                    )
                expected_ras[uid] = (ras_affine(image) @ np.array([2, 3, 4, 1.0]))[:3]
    _write_csv(root / "annotations.csv", rows)
    _, labels, _ = _check_outputs(adapt_dataset("luna16", root, tmp_path / "out"), 6)
    labels = labels.set_index("scan_id")
    for uid, ras in expected_ras.items():
        got = labels.loc[uid, ["nodule_x_mm", "nodule_y_mm", "nodule_z_mm"]].to_numpy(float)
        np.testing.assert_allclose(got, ras, atol=1e-6)
        assert labels.loc[uid, "nodule_diameter_mm"] == 12 and labels.loc[uid, "n_nodules"] == 2
    assert labels.groupby("subset")["split"].first().to_dict() == {0: "train", 7: "val", 8: "test"}
    assert labels["nodule_present"].sum() == 3
    (root / "subset0" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.00.raw").unlink()
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("luna16", root, tmp_path / "out")
    _one_line_error(excinfo, "expected the .raw named by each .mhd")


# --- TotalSegmentator -----------------------------------------------------------------------


def test_label_statistics_by_hand():
    label_map = np.zeros((5, 6, 7), np.uint8)
    label_map[1:3, 2, 3] = 2  # voxels (1,2,3), (2,2,3): mean index (1.5, 2, 3)
    affine = np.array([[-2.0, 0, 0, 10], [0, 0, 3, -5], [0, 1.5, 0, 7], [0, 0, 0, 1]])
    stats = label_statistics(label_map, affine, (1, 2))
    assert stats[1] == (None, 0.0)
    centre, volume = stats[2]
    np.testing.assert_allclose(centre, [10 - 3.0, -5 + 9.0, 7 + 3.0])
    assert volume == pytest.approx(2 * 9.0 / 1000)


def _totalseg_tree(root: Path) -> tuple[Path, np.ndarray]:
    affine = np.array([[-1.5, 0, 0, 40], [0, 1.5, 0, -20], [0, 0, 2.0, -100], [0, 0, 0, 1]])
    rows = []
    for k, split in enumerate(("train", "train", "val", "test")):
        scan = root / f"s{k:04d}"
        _nifti(scan / "ct.nii.gz", (6, 6, 5), affine)
        for value, structure in enumerate(("liver", "spleen", "kidney_left"), start=1):
            mask = np.zeros((6, 6, 5), np.uint8)
            if not (structure == "spleen" and k == 3):  # s0003 has no spleen
                mask[value, k : k + 2, 2] = 1
            _nifti(scan / "segmentations" / f"{structure}.nii.gz", data=mask, affine=affine)
        rows.append(
            {
                "image_id": f"s{k:04d}",
                "age": 50 + k,
                "gender": "f",
                "institute": "A",
                "study_type": "ct abdomen",
                "split": split,
                "manufacturer": "x",
                "scanner_model": "y",
                "kvp": 120,
                "pathology": "",
                "pathology_location": "",
            }
        )
    _write_csv(root / "meta.csv", rows, sep=";")
    return root, affine


def test_totalsegmentator(tmp_path):
    root, affine = _totalseg_tree(tmp_path / "ts")
    out = tmp_path / "out"
    result = adapt_dataset("totalsegmentator", root, out, structures="liver,spleen")
    manifest, labels, info = _check_outputs(result, 4)
    assert labels.set_index("scan_id")["split"].to_dict() == {
        "s0000": "train",
        "s0001": "train",
        "s0002": "val",
        "s0003": "test",
    }
    label_map = nib.load(out / "labels" / "s0001.nii.gz")
    np.testing.assert_array_equal(label_map.affine, affine)
    data = np.asarray(label_map.dataobj)
    assert set(np.unique(data)) == {0, 1, 2} and (data == 1).sum() == 2
    row = labels.set_index("scan_id").loc["s0001"]
    # liver of s0001 at voxels (1, 1, 2) and (1, 2, 2): mean index (1, 1.5, 2).
    np.testing.assert_allclose(
        row[["liver_x_mm", "liver_y_mm", "liver_z_mm"]].to_numpy(float),
        (affine @ [1, 1.5, 2, 1])[:3],
    )
    assert row["liver_volume_ml"] == pytest.approx(2 * 1.5 * 1.5 * 2 / 1000)
    assert np.isnan(labels.set_index("scan_id").loc["s0003", "spleen_x_mm"])
    assert json.loads((out / "label_names.json").read_text()) == {
        "0": "background",
        "1": "liver",
        "2": "spleen",
    }
    assert all(
        path == str(out / "labels" / f"{scan}.nii.gz")
        for scan, path in zip(manifest["scan_id"], manifest["label_organs"])
    )
    assert info["tasks"]["totalseg_organs"]["options"]["classes"] == {"1": "liver", "2": "spleen"}
    # A rerun with the same sources reuses the label maps.
    before = (out / "labels" / "s0000.nii.gz").stat().st_mtime_ns
    adapt_dataset("totalsegmentator", root, out, structures=["liver", "spleen"])
    assert (out / "labels" / "s0000.nii.gz").stat().st_mtime_ns == before
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("totalsegmentator", root, out, structures="liver,pancreas")
    _one_line_error(excinfo, "pancreas.nii.gz", "expected a mask per structure")


def test_totalsegmentator_bad_meta(tmp_path):
    root, _ = _totalseg_tree(tmp_path / "ts")
    table = pd.read_csv(root / "meta.csv", sep=";").drop(columns="split")
    table.to_csv(root / "meta.csv", sep=";", index=False)
    with pytest.raises(InputError) as excinfo:
        adapt_dataset("totalsegmentator", root, tmp_path / "out")
    _one_line_error(excinfo, "expected the TotalSegmentator meta table with column(s) split")


# --- registry and command line --------------------------------------------------------------


def test_registry_errors(tmp_path):
    assert set(ADAPTERS) >= {
        "ctrate",
        "rsna_pe",
        "nsclc_radiomics",
        "osic",
        "luna16",
        "totalsegmentator",
        "shared_ct",
    }
    with pytest.raises(VoxelFMError, match="unknown dataset adapter"):
        adapt_dataset("nope", tmp_path, tmp_path / "out")
    with pytest.raises(VoxelFMError, match="unknown option"):
        adapt_dataset("osic", tmp_path, tmp_path / "out", colour="red")


def test_cli_adapt(tmp_path, capsys):
    assert main(["adapt", "--list"]) == 0
    assert "totalsegmentator" in capsys.readouterr().out
    root = _osic_tree(tmp_path / "osic", n=10)
    out = tmp_path / "out"
    argv = [
        "adapt",
        "osic",
        "--root",
        str(root),
        "--out",
        str(out),
        "--seed",
        "2",
        "--option",
        "split_fractions=[0.6, 0.2, 0.2]",
    ]
    assert main(argv) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"]["scans_per_split"] == {"train": 6, "val": 2, "test": 2}
    assert main(["adapt", "osic", "--root", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "expected the osic dataset folder" in capsys.readouterr().err


# --- the real CT folder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_ct(real_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared_ct")
    return real_data, adapt_dataset("shared_ct", real_data, out, seed=0)


@pytest.mark.realdata
def test_shared_ct_volumes_match_patients_csv(shared_ct):
    real_data, result = shared_ct
    manifest, labels, _ = _check_outputs(result, len(read_manifest(result.manifest)))
    patients = pd.read_csv(real_data / "openkbp" / "patients.csv").set_index("patient_id")
    kbp = labels[labels["cohort"] == "openkbp"].set_index("scan_id")
    assert len(kbp) == len(patients)
    # PTV70 wins overlaps in ptv.nii.gz, so its label-map volume is the contoured volume.
    np.testing.assert_allclose(
        kbp["ptv70_volume_ml"], patients.loc[kbp.index, "PTV70_ml"], rtol=1e-3, atol=1e-3
    )
    assert (kbp["ptv63_present"] == patients.loc[kbp.index, "PTV63_ml"].notna()).all()
    doses = patients.loc[kbp.index, ["RightParotid_mean_dose_gy", "LeftParotid_mean_dose_gy"]]
    np.testing.assert_allclose(kbp["parotid_mean_dose_gy"], doses.mean(axis=1))
    # An organ's centroid exists exactly when patients.csv gives it a volume.
    assert (kbp["mandible_x_mm"].notna() == patients.loc[kbp.index, "Mandible_ml"].notna()).all()
    # RAS: x grows toward the patient's right, so the right parotid has the larger x.
    both = kbp[["right_parotid_x_mm", "left_parotid_x_mm"]].dropna()
    assert (both["right_parotid_x_mm"] > both["left_parotid_x_mm"]).all()
    validation = patients.index[patients["split"] == "validation"]
    assert (kbp.loc[validation, "split"] == "val").all()
    assert set(kbp["split"]) == {"train", "val", "test"}
    ibsi = labels[labels["cohort"] == "ibsi"]
    assert len(ibsi) == 30 and (ibsi["gtv_volume_ml"] > 0).all()
    assert set(labels["cohort"]) == {"openkbp", "ibsi", "totalseg", "dicom"}
    assert manifest["label_organs"].astype(bool).sum() == 2


@pytest.mark.realdata
def test_shared_ct_gtv_volume_independent(shared_ct):
    """GTV volume of one IBSI patient recomputed with SimpleITK (LPS world, its own reader)."""
    real_data, result = shared_ct
    labels = pd.read_csv(result.labels).set_index("scan_id")
    mask = sitk.ReadImage(str(real_data / "ibsi_sts" / "STS_001" / "gtv.nii.gz"))
    voxels = int((sitk.GetArrayViewFromImage(mask) > 0).sum())
    expected = voxels * float(np.prod(mask.GetSpacing())) / 1000
    assert labels.loc["STS_001", "gtv_volume_ml"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.realdata
def test_shared_ct_reidentification_copies(real_data, tmp_path):
    """Copies are the same anatomy at the same world position (crop + noise), same split."""
    import nibabel as nib

    root = tmp_path / "root"
    (root / "openkbp").mkdir(parents=True)
    patients = pd.read_csv(real_data / "openkbp" / "patients.csv", dtype={"patient_id": str})
    subset = patients.head(3)
    subset.to_csv(root / "openkbp" / "patients.csv", index=False)
    for patient_id in subset["patient_id"]:
        (root / "openkbp" / patient_id).symlink_to(real_data / "openkbp" / patient_id)
    result = adapt_dataset("shared_ct", root, tmp_path / "out", reidentification_copies=1)
    labels = pd.read_csv(result.out_dir / "labels.csv", dtype={"scan_id": str})
    manifest = pd.read_csv(result.out_dir / "manifest.csv", dtype=str).fillna("")
    assert len(labels) == 6 and "reidentification" in result.tasks
    copies = labels[labels["cohort"] == "openkbp_copy"]
    for copy in copies.itertuples(index=False):
        original_id = copy.scan_id.removesuffix("_copy1")
        original = labels.set_index("scan_id").loc[original_id]
        assert copy.patient_id == original.patient_id and copy.split == original.split
        assert pd.isna(copy.ptv63_present)  # no label values: no task sees a patient twice
        row = manifest.set_index("scan_id").loc[copy.scan_id]
        assert row["label_oars"] == ""
        derived, source = (
            nib.load(row["image"]),
            nib.load(manifest.set_index("scan_id").loc[original_id, "image"]),
        )
        assert all(d < s for d, s in zip(derived.shape, source.shape))
        # Sample the source at the copy's voxel centres through the two affines.
        index = np.stack(np.meshgrid(*(np.arange(0, n, 7) for n in derived.shape), indexing="ij"))
        world = (
            np.tensordot(derived.affine[:3, :3], index, 1) + derived.affine[:3, 3, None, None, None]
        )
        source_index = np.rint(
            np.tensordot(
                np.linalg.inv(source.affine[:3, :3]),
                world - source.affine[:3, 3, None, None, None],
                1,
            )
        ).astype(int)
        copy_values = np.asarray(derived.dataobj)[tuple(index)]
        source_values = np.asarray(source.dataobj)[tuple(source_index)]
        assert np.abs(copy_values - source_values.astype(float)).mean() < 50  # noise only
