"""Hostile input at the reading layer: absurd geometry, damaged DICOM slices, and a cohort of
every kind of bad input beside good scans (none of which may be lost)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from io_fixtures import BAD_INPUTS, synthetic_ct, write_nifti

from voxelfm.errors import InputError
from voxelfm.ingest.shards import run_shard
from voxelfm.io.dicom_write import write_dicom_series
from voxelfm.io.geometry import GeometryLimits
from voxelfm.io.preprocess import preprocess_scan
from voxelfm.io.readers import read_image
from voxelfm.store import VolumeStore

FAST = {"spacing": (2.0, 2.0, 2.0), "progress": False}


# --------------------------------------------------------------- hole 4: geometry


def test_qform_and_sform_that_disagree_give_a_warning(tmp_path):
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    shifted = affine.copy()
    shifted[:3, 3] = [50.0, 0.0, 0.0]
    image = nib.Nifti1Image(np.full((12, 10, 8), 40, np.int16), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(shifted, code=2)
    image.update_header = lambda: None  # keep the two forms as set
    path = tmp_path / "two_forms.nii"
    nib.save(image, path)
    _, meta = read_image(path)
    assert any("qform and sform disagree (by up to 50 mm)" in w for w in meta["warnings"])
    _, agreeing = read_image(write_nifti(synthetic_ct(), tmp_path / "fine.nii"))
    assert agreeing["warnings"] == []


def test_a_canonical_grid_over_the_voxel_limit_is_refused_before_resampling(tmp_path):
    path = write_nifti(synthetic_ct(spacing=(15.0, 15.0, 15.0)), tmp_path / "coarse.nii.gz")
    with pytest.raises(InputError) as caught:
        preprocess_scan(path, spacing=(0.1, 0.1, 0.1), limits=GeometryLimits(max_voxels=10**8))
    assert str(caught.value).startswith(f"{path}: would resample to ")
    assert "above the limit of 100,000,000 (preprocess.max_voxels)" in str(caught.value)


def test_geometry_limits_come_from_the_preprocess_config(tmp_path):
    """A limit set in the config's preprocess section reaches the shard job: a 2 mm scan fails
    under max_spacing_mm 1.5 with that limit named, and is stored under the default."""
    image = write_nifti(synthetic_ct(spacing=(0.8, 0.9, 2.0)), tmp_path / "scan.nii.gz")
    shard = tmp_path / "shard.csv"
    pd.DataFrame({"scan_id": ["s"], "patient_id": ["p"], "image": [str(image)]}).to_csv(
        shard, index=False
    )

    def preprocess(params: dict, name: str) -> pd.DataFrame:
        subprocess.run(
            [sys.executable, "-m", "voxelfm", "preprocess", "--shard", str(shard),
             "--store", str(tmp_path / f"{name}.zarr"), "--qc", str(tmp_path / f"{name}_qc.csv"),
             "--failures", str(tmp_path / f"{name}_f.csv"), "--params", json.dumps(params)],
            check=True, capture_output=True,
        )  # fmt: skip
        return pd.read_csv(tmp_path / f"{name}_f.csv")

    strict_limit = preprocess({"spacing_mm": [2, 2, 2], "max_spacing_mm": 1.5}, "strict")
    assert (
        "above the plausible maximum of 1.5 mm (preprocess.max_spacing_mm)"
        in (strict_limit.loc[0, "reason"])
    )
    assert preprocess({"spacing_mm": [2, 2, 2]}, "default").empty


def test_schema_defaults_match_the_reader_defaults():
    import yaml
    from conftest import REPO_ROOT

    schema = yaml.safe_load((REPO_ROOT / "workflow/schemas/config.schema.yaml").read_text())
    preprocess = schema["properties"]["preprocess"]["properties"]
    defaults = GeometryLimits()
    for key in ("min_spacing_mm", "max_spacing_mm", "max_voxels"):
        assert preprocess[key]["default"] == getattr(defaults, key), key


# ------------------------------------------------------ hole 6: damaged DICOM slices


def test_a_uid_named_slice_file_is_reported_by_position_not_by_its_uid(tmp_path):
    files = write_dicom_series(synthetic_ct(), tmp_path / "series")
    renamed = []
    for file in files:
        uid = pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID
        renamed.append(file.rename(file.with_name(f"{uid}.dcm")))
    dataset = pydicom.dcmread(renamed[4])
    del dataset.PixelData
    dataset.save_as(renamed[4])
    with pytest.raises(InputError) as caught:
        read_image(tmp_path / "series")
    message = str(caught.value)
    assert "has no pixel data" in message and "(by name)" in message
    assert all(f.stem not in message for f in renamed)


def test_a_file_of_another_series_or_a_non_dicom_file_beside_the_series_is_ignored(tmp_path):
    files = write_dicom_series(synthetic_ct(), tmp_path / "series")
    (tmp_path / "series" / "README.txt").write_text("exported by a PACS")
    image, _ = read_image(tmp_path / "series")
    assert image.GetSize()[2] == len(files)


# --------------------------------------- "done when": the bad-input cohort, >= 25 kinds


def _bad_label_rows(folder: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Bad label maps beside a good image: (manifest row, words the reason must contain)."""
    folder.mkdir(parents=True)
    image = write_nifti(synthetic_ct(seed=7), folder / "image.nii.gz")
    negative = sitk.Cast(sitk.Image(12, 10, 8, sitk.sitkInt16) - 3, sitk.sitkInt16)
    negative.CopyInformation(synthetic_ct())
    elsewhere = sitk.Image(12, 10, 8, sitk.sitkUInt8)
    elsewhere.SetOrigin((900.0, 900.0, 900.0))
    fractional = sitk.Image(12, 10, 8, sitk.sitkFloat32) + 0.5
    fractional.CopyInformation(synthetic_ct())
    rows = {}
    for name, label, reason in [
        ("label_negative", negative, "negative values"),
        ("label_not_overlapping", elsewhere, "does not overlap the image"),
        ("label_fractional", fractional, "non-integer values"),
    ]:
        path = write_nifti(label, folder / f"{name}.nii.gz")
        rows[name] = ({"image": str(image), "label_seg": str(path)}, reason)
    rows["label_missing"] = (
        {"image": str(image), "label_seg": str(folder / "gone.nii.gz")},
        "does not exist",
    )
    return rows


def test_bad_input_cohort_every_kind_rejected_with_its_reason_and_no_good_scan_lost(tmp_path):
    good_rows = []
    for n in range(3):
        image = synthetic_ct(seed=n, marker_index=(6, 5, 4), marker_radius=1)
        good_rows.append({"scan_id": f"good_nifti{n}", "patient_id": f"g{n}",
                          "image": str(write_nifti(image, tmp_path / f"good{n}.nii.gz")),
                          "label_seg": ""})  # fmt: skip
    write_dicom_series(synthetic_ct(seed=5), tmp_path / "good_dicom")
    good_rows.append({"scan_id": "good_dicom", "patient_id": "g9",
                      "image": str(tmp_path / "good_dicom"), "label_seg": ""})  # fmt: skip

    expected: dict[str, str] = {}
    bad_rows = []
    for kind, (build, reason) in BAD_INPUTS.items():
        folder = tmp_path / "bad" / kind
        folder.mkdir(parents=True)
        scan_id = "bad_" + kind.replace("-", "_")
        bad_rows.append({"scan_id": scan_id, "patient_id": f"b_{kind}",
                         "image": str(build(folder)), "label_seg": ""})  # fmt: skip
        expected[scan_id] = reason
    for kind, (row, reason) in _bad_label_rows(tmp_path / "labels").items():
        bad_rows.append({"scan_id": f"bad_{kind}", "patient_id": f"b_{kind}", **row})
        expected[f"bad_{kind}"] = reason
    assert len(expected) >= 25, f"only {len(expected)} kinds of bad input"

    # Good scans first, between and last: a bad neighbour must not take a good scan down.
    rows = [good_rows[0], *bad_rows[:15], good_rows[1], *bad_rows[15:], good_rows[2],
            good_rows[3]]  # fmt: skip
    shard = tmp_path / "shard_000.csv"
    pd.DataFrame(rows).to_csv(shard, index=False)
    out = tmp_path / "out"
    report = run_shard(shard, out / "s.zarr", out / "f.csv", out / "q.csv", workers=2, **FAST)

    assert (report.stored, report.failed) == (len(good_rows), len(expected))
    assert VolumeStore(out / "s.zarr").scan_ids == sorted(r["scan_id"] for r in good_rows)
    failures = pd.read_csv(out / "f.csv").set_index("scan_id")
    assert sorted(failures.index) == sorted(expected)
    for scan_id, reason in expected.items():
        line = failures.loc[scan_id, "reason"]
        assert reason in line and "\n" not in line, (scan_id, line)
        assert failures.loc[scan_id, "error_type"] == "InputError", (scan_id, line)
