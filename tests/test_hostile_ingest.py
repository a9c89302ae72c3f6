"""Hostile input at the ingestion layer: a --store that is someone's folder, patients in two
splits, identical images under two patients, DICOM UIDs typed into a manifest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from io_fixtures import make_two_series_folder, synthetic_ct, write_nifti

from voxelfm.errors import InputError
from voxelfm.ingest.manifest import read_manifest
from voxelfm.ingest.shards import run_shard, split_manifest
from voxelfm.ingest.summary import summarize
from voxelfm.store import VolumeStore

FAST = {"spacing": (2.0, 2.0, 2.0), "progress": False}


def one_scan_shard(tmp_path: Path, scan_ids=("s0",), patients=("p0",)) -> Path:
    rows = []
    for n, (scan_id, patient) in enumerate(zip(scan_ids, patients)):
        image = write_nifti(synthetic_ct(seed=n), tmp_path / f"{scan_id}.nii.gz")
        rows.append({"scan_id": scan_id, "patient_id": patient, "image": str(image)})
    path = tmp_path / "shard_000.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ------------------------------------------------ hole 3: never delete a user's folder


@pytest.mark.parametrize("kind", ["user_folder", "other_zarr_store", "empty_folder"])
def test_preprocess_refuses_a_store_folder_it_did_not_write(tmp_path, kind):
    shard = one_scan_shard(tmp_path)
    target = tmp_path / "precious"
    target.mkdir()
    if kind == "user_folder":
        (target / "thesis").mkdir()
        (target / "thesis" / "chapter1.tex").write_text("years of work")
        (target / "notes.txt").write_text("keep me")
    elif kind == "other_zarr_store":
        import zarr

        group = zarr.open_group(target, mode="w", zarr_format=3)
        group.create_group("experiment").create_array("x", shape=(3,), dtype="i2")
    before = sorted(p.relative_to(target) for p in target.rglob("*"))

    result = subprocess.run(
        [sys.executable, "-m", "voxelfm", "preprocess", "--shard", str(shard), "--store",
         str(target), "--qc", str(tmp_path / "qc.csv"), "--failures", str(tmp_path / "f.csv")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "not a VoxelFM shard store" in lines[0]
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert not target.with_name("precious.partial").exists()


def test_a_store_this_tool_wrote_is_still_resumed_and_replaced(tmp_path):
    shard = one_scan_shard(tmp_path, scan_ids=("s0", "s1"), patients=("p0", "p1"))
    out = {"out_store": tmp_path / "shard.zarr", "failures_csv": tmp_path / "f.csv",
           "qc_csv": tmp_path / "qc.csv"}  # fmt: skip
    assert run_shard(shard, **out, **FAST).stored == 2
    assert run_shard(shard, **out, **FAST).resumed == 2
    # A partial store left by a killed run of this tool is resumed too.
    shutil.copytree(out["out_store"], tmp_path / "shard.zarr.partial")
    shutil.rmtree(out["out_store"])
    assert run_shard(shard, **out, **FAST).resumed == 2


def test_a_user_folder_at_the_partial_name_is_never_touched(tmp_path):
    shard = one_scan_shard(tmp_path)
    partial = tmp_path / "shard.zarr.partial"
    partial.mkdir()
    (partial / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a VoxelFM shard store"):
        run_shard(shard, tmp_path / "shard.zarr", tmp_path / "f.csv", tmp_path / "q.csv", **FAST)
    assert (partial / "keep.txt").read_text() == "mine"


# ------------------------------------------ hole 5: leakage caught when labels are read


def test_patient_in_two_splits_is_refused_when_the_label_table_is_validated(tmp_path):
    manifest = read_manifest(one_scan_shard(tmp_path, ("a", "b", "c"), ("p1", "p1", "p2")))
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"scan_id": ["a", "b", "c"], "patient_id": ["p1", "p1", "p2"],
         "split": ["train", "test", "val"], "y": [1, 0, 1]}
    ).to_csv(labels, index=False)  # fmt: skip
    from voxelfm.ingest.manifest import check_label_table

    with pytest.raises(InputError) as caught:
        check_label_table(labels, manifest)
    assert str(caught.value).startswith(f"{labels}: ") and "p1" in str(caught.value)
    assert "more than one split" in str(caught.value)


def test_label_table_patient_disagreeing_with_the_manifest_is_refused(tmp_path):
    manifest = read_manifest(one_scan_shard(tmp_path, ("a", "b"), ("p1", "p2")))
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"scan_id": ["a", "b"], "patient_id": ["p1", "p9"], "split": ["train", "test"]}
    ).to_csv(labels, index=False)
    from voxelfm.ingest.manifest import check_label_table

    with pytest.raises(InputError, match="patient"):
        check_label_table(labels, manifest)


def test_manifest_command_checks_the_label_table(tmp_path):
    source = one_scan_shard(tmp_path, ("a", "b"), ("p1", "p1"))
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"scan_id": ["a", "b"], "patient_id": ["p1", "p1"], "split": ["train", "test"]}
    ).to_csv(labels, index=False)
    result = subprocess.run(
        [sys.executable, "-m", "voxelfm", "manifest", "--source", str(source), "--labels",
         str(labels), "--out", str(tmp_path / "validated.csv")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "more than one split" in result.stderr, result.stderr
    assert not (tmp_path / "validated.csv").exists()


def test_identical_images_under_two_patients_are_flagged_in_the_summary(tmp_path):
    shard = one_scan_shard(tmp_path, ("a", "b", "c"), ("p1", "p2", "p3"))
    table = pd.read_csv(shard)
    copy = tmp_path / "renamed_copy.nii.gz"
    shutil.copy(table.loc[0, "image"], copy)
    table.loc[2, "image"] = str(copy)  # scan c of patient p3 is scan a of patient p1
    table.to_csv(shard, index=False)
    out = tmp_path / "out"
    run_shard(shard, out / "s.zarr", out / "f.csv", out / "q.csv", **FAST)
    summary = summarize([out / "s.zarr"], [out / "q.csv"], [out / "f.csv"], out / "sum",
                        mosaic_scans=0)  # fmt: skip
    groups = summary["identical_images_across_patients"]
    assert [sorted(g["scan_ids"]) for g in groups] == [["a", "c"]]
    assert sorted(groups[0]["patient_ids"]) == ["p1", "p3"]


# ---------------------------------------------- hole 11: series UIDs never in outputs


def test_series_uid_in_the_manifest_never_reaches_derived_outputs(tmp_path):
    folder = make_two_series_folder(tmp_path)
    uids = sorted(
        {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in folder.iterdir()}
    )
    source = tmp_path / "manifest.csv"
    pd.DataFrame(
        {"scan_id": ["x", "y"], "patient_id": ["p1", "p2"], "image": [str(folder)] * 2,
         "series_uid": uids}
    ).to_csv(source, index=False)  # fmt: skip
    validated = tmp_path / "validated.csv"
    subprocess.run(
        [sys.executable, "-m", "voxelfm", "manifest", "--source", str(source), "--out",
         str(validated)], check=True, capture_output=True,
    )  # fmt: skip
    shards = split_manifest(validated, 1, tmp_path / "shards")
    out = tmp_path / "out"
    report = run_shard(shards[0], out / "s.zarr", out / "f.csv", out / "q.csv", **FAST)
    assert (report.stored, report.failed) == (2, 0)
    store = VolumeStore(out / "s.zarr")
    # Functionality kept: each row still picks its own series.
    assert (store.read_volume("x") != store.read_volume("y")).any()
    derived = [validated, *shards, out / "f.csv", out / "q.csv", *out.rglob("zarr.json")]
    for path in derived:
        text = path.read_text()
        for uid in uids:
            assert uid not in text, f"series UID in clear in {path}"
