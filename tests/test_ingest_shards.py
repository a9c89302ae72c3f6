"""Sharding a manifest and ingesting a shard: failures recorded, resume, strict, bounded work."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from io_fixtures import BAD_INPUTS, synthetic_ct, write_nifti

import voxelfm.io.preprocess
from voxelfm.errors import InputError
from voxelfm.ingest.qc import scan_qc
from voxelfm.ingest.shards import run_shard, split_manifest
from voxelfm.store import VolumeStore, list_complete_scans
from voxelfm.volume import CanonicalVolume

BAD_CASES = [
    "truncated_gzip",
    "empty_file",
    "two_series",
    "missing_slice",
    "mr_series",
    "2d_image",
    "nan_voxels",
    "nonexistent",
]


def good_scan(folder: Path, name: str, seed: int, with_label: bool) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    image = synthetic_ct(seed=seed, marker_index=(6, 5, 4), marker_radius=1)
    row = {"image": str(write_nifti(image, folder / f"{name}.nii.gz")), "label_seg": ""}
    if with_label:
        label = sitk.Cast(sitk.BinaryThreshold(image, 500, 5000, 2, 0), sitk.sitkUInt8)
        row["label_seg"] = str(write_nifti(label, folder / f"{name}_seg.nii.gz"))
    return row


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def mixed_shard(tmp_path):
    """A shard manifest with 3 good scans (one with a label) and one scan per bad input."""
    rows = []
    for n in range(3):
        rows.append(
            {
                "scan_id": f"good{n}",
                "patient_id": f"p{n}",
                **good_scan(tmp_path / "good", f"good{n}", n, with_label=n == 0),
            }
        )
    for case in BAD_CASES:
        build, _ = BAD_INPUTS[case]
        folder = tmp_path / "bad" / case
        folder.mkdir(parents=True)
        rows.append(
            {
                "scan_id": f"bad_{case}",
                "patient_id": "pbad",
                "image": str(build(folder)),
                "label_seg": "",
            }
        )
    return write_manifest(tmp_path / "shard_000.csv", rows)


def outputs(tmp_path: Path) -> dict[str, Path]:
    return {
        "out_store": tmp_path / "out" / "shard_000.zarr",
        "failures_csv": tmp_path / "out" / "failures.csv",
        "qc_csv": tmp_path / "out" / "qc.csv",
    }


FAST = {"spacing": (2.0, 2.0, 2.0), "progress": False}


def test_bad_scans_are_recorded_and_good_scans_stored(tmp_path, mixed_shard):
    out = outputs(tmp_path)
    report = run_shard(mixed_shard, **out, **FAST)
    assert (report.stored, report.resumed, report.failed) == (3, 0, len(BAD_CASES))

    store = VolumeStore(out["out_store"])
    assert store.scan_ids == ["good0", "good1", "good2"]
    assert store.label_names("good0") == ["seg"] and store.label_names("good1") == []
    assert not out["out_store"].with_name("shard_000.zarr.partial").exists()

    failures = pd.read_csv(out["failures_csv"]).set_index("scan_id")
    assert sorted(failures.index) == sorted(f"bad_{case}" for case in BAD_CASES)
    for case in BAD_CASES:
        reason = failures.loc[f"bad_{case}", "reason"]
        assert BAD_INPUTS[case][1] in reason and "\n" not in reason
        assert failures.loc[f"bad_{case}", "error_type"] == "InputError"

    qc = pd.read_csv(out["qc_csv"]).set_index("scan_id")
    assert list(qc.index) == ["good0", "good1", "good2"]
    assert qc.loc["good0", "spacing"] == "2x2x2"
    assert qc.loc["good0", "original_shape"] == "12x10x8"
    assert qc.loc["good0", "label_seg_voxels"] > 0
    assert qc.loc["good0", "hu_p1"] <= qc.loc["good0", "hu_p50"] <= qc.loc["good0", "hu_p99"]
    assert 0 <= qc.loc["good0", "frac_at_hu_min"] < 1
    assert (qc["elapsed_s"] > 0).all()


def test_rerun_skips_unchanged_scans_and_redoes_changed_ones(tmp_path):
    rows = [
        {"scan_id": f"s{n}", "patient_id": "p", **good_scan(tmp_path / "in", f"s{n}", n, False)}
        for n in range(3)
    ]
    manifest = write_manifest(tmp_path / "shard.csv", rows)
    out = outputs(tmp_path)
    assert run_shard(manifest, **out, **FAST).stored == 3
    first_qc = pd.read_csv(out["qc_csv"])

    again = run_shard(manifest, **out, **FAST)
    assert (again.stored, again.resumed) == (0, 3)
    pd.testing.assert_frame_equal(
        pd.read_csv(out["qc_csv"]), first_qc
    )  # QC kept from the first run

    write_nifti(synthetic_ct(seed=99), Path(rows[1]["image"]))  # one input changes
    changed = run_shard(manifest, **out, **FAST)
    assert (changed.stored, changed.resumed) == (1, 2)

    other_spacing = run_shard(manifest, **out, spacing=(3.0, 3.0, 3.0), progress=False)
    assert other_spacing.stored == 3
    assert VolumeStore(out["out_store"]).attrs("s0")["spacing"] == [3.0, 3.0, 3.0]

    write_manifest(manifest, rows[:2])  # a row leaves the shard: its scan leaves the store
    run_shard(manifest, **out, spacing=(3.0, 3.0, 3.0), progress=False)
    assert VolumeStore(out["out_store"]).scan_ids == ["s0", "s1"]


def test_strict_mode_raises_the_one_line_reason_and_a_rerun_resumes(tmp_path):
    good = [
        {"scan_id": f"s{n}", "patient_id": "p", **good_scan(tmp_path / "in", f"s{n}", n, False)}
        for n in range(2)
    ]
    truncated = BAD_INPUTS["truncated_gzip"][0](tmp_path)
    manifest = write_manifest(
        tmp_path / "shard.csv",
        good + [{"scan_id": "bad", "patient_id": "p", "image": str(truncated), "label_seg": ""}],
    )
    out = outputs(tmp_path)
    with pytest.raises(InputError) as caught:
        run_shard(manifest, **out, strict=True, workers=1, **FAST)
    assert str(caught.value).startswith(f"{truncated}: ") and "\n" not in str(caught.value)
    assert not out["out_store"].exists() and not out["qc_csv"].exists()  # nothing looks finished
    stored_before_the_failure = list_complete_scans(tmp_path / "out" / "shard_000.zarr.partial")

    report = run_shard(manifest, **out, **FAST)
    assert report.resumed == len(stored_before_the_failure)
    assert (report.resumed + report.stored, report.failed) == (2, 1)


def test_strict_mode_checks_files_before_any_work(tmp_path):
    manifest = write_manifest(
        tmp_path / "shard.csv", [{"scan_id": "s", "patient_id": "p", "image": "nowhere.nii.gz"}]
    )
    with pytest.raises(InputError, match="line 2: image .*nowhere.nii.gz does not exist"):
        run_shard(manifest, **outputs(tmp_path), strict=True, **FAST)


def test_unexpected_exceptions_are_recorded_with_their_type_on_one_line(tmp_path, monkeypatch):
    rows = [
        {"scan_id": f"s{n}", "patient_id": "p", **good_scan(tmp_path / "in", f"s{n}", n, False)}
        for n in range(2)
    ]
    manifest = write_manifest(tmp_path / "shard.csv", rows)
    real_preprocess = voxelfm.io.preprocess.preprocess_scan

    def flaky(image, *args, **kwargs):
        if image.endswith("s1.nii.gz"):
            raise RuntimeError("resampler exploded\nat line 2")
        return real_preprocess(image, *args, **kwargs)

    monkeypatch.setattr(voxelfm.io.preprocess, "preprocess_scan", flaky)
    out = outputs(tmp_path)
    assert run_shard(manifest, **out, **FAST).failed == 1
    failures = pd.read_csv(out["failures_csv"])
    assert failures.to_dict("records") == [
        {
            "scan_id": "s1",
            "image": rows[1]["image"],
            "error_type": "RuntimeError",
            "reason": "RuntimeError: resampler exploded at line 2",
        }
    ]


def test_at_most_workers_scans_are_in_flight(tmp_path, monkeypatch):
    rows = [
        {"scan_id": f"s{n}", "patient_id": "p", **good_scan(tmp_path / "in", f"s{n}", n, False)}
        for n in range(8)
    ]
    manifest = write_manifest(tmp_path / "shard.csv", rows)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def tracked(image, *args, **kwargs):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return CanonicalVolume(np.zeros((4, 4, 4), np.int16), (2.0,) * 3, (0.0,) * 3)

    monkeypatch.setattr(voxelfm.io.preprocess, "preprocess_scan", tracked)
    assert run_shard(manifest, **outputs(tmp_path), workers=2, **FAST).stored == 8
    assert peak[0] == 2


def test_qc_numbers_of_a_known_volume():
    image = np.full((10, 10, 10), 40, np.int16)
    image[:2] = -1024  # 20% padding
    image[8:] = 1000
    label = np.zeros_like(image, np.uint8)
    label[4:6, 4:6, 4:6] = 1
    volume = CanonicalVolume(
        image,
        (1.5, 1.5, 2.0),
        (0, 0, 0),
        labels={"tumour": label},
        meta={"original_shape": [5, 5, 5], "original_axcodes": "LPS", "warnings": ["a\nb", "c"]},
    )
    qc = scan_qc(volume)
    assert qc["shape"] == "10x10x10" and qc["spacing"] == "1.5x1.5x2"
    assert qc["original_shape"] == "5x5x5" and qc["original_axcodes"] == "LPS"
    assert (qc["hu_p1"], qc["hu_p50"], qc["hu_p99"]) == (-1024, 40, 1000)
    assert qc["frac_at_hu_min"] == pytest.approx(0.2)
    assert qc["label_tumour_voxels"] == 8
    assert qc["n_warnings"] == 2 and qc["warnings"] == "a b | c"


def test_split_keeps_patients_together_balances_rows_and_is_deterministic(tmp_path):
    rows = [
        {"scan_id": f"s{n}", "patient_id": f"p{n // 3 if n < 6 else n}", "image": f"{n}.nii.gz"}
        for n in range(10)
    ]  # p0 and p1 have 3 scans each, then 4 single-scan patients
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    paths = split_manifest(manifest, 3, tmp_path / "shards")
    assert [p.name for p in paths] == ["shard_000.csv", "shard_001.csv", "shard_002.csv"]
    shards = [pd.read_csv(p, dtype=str) for p in paths]
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    for patient in {r["patient_id"] for r in rows}:
        assert sum(patient in set(s["patient_id"]) for s in shards) == 1
    assert all(Path(image).is_absolute() for s in shards for image in s["image"])
    first = [p.read_bytes() for p in paths]
    split_manifest(manifest, 3, tmp_path / "shards")
    assert [p.read_bytes() for p in paths] == first


def test_more_shards_than_patients_gives_empty_shards_that_ingest_to_empty_stores(tmp_path):
    rows = [{"scan_id": "s0", "patient_id": "p", **good_scan(tmp_path / "in", "s0", 0, False)}]
    paths = split_manifest(write_manifest(tmp_path / "m.csv", rows), 2, tmp_path / "shards")
    out = outputs(tmp_path)
    assert run_shard(paths[1], **out, **FAST).stored == 0
    assert VolumeStore(out["out_store"]).scan_ids == []
    assert pd.read_csv(out["failures_csv"]).empty and pd.read_csv(out["qc_csv"]).empty


@pytest.mark.realdata
def test_real_openkbp_scan_with_labels(tmp_path, real_data):
    patient = real_data / "openkbp" / "openkbp_train_pt_1"
    manifest = write_manifest(
        tmp_path / "shard.csv",
        [
            {
                "scan_id": "kbp1",
                "patient_id": "pt_1",
                "image": str(patient / "ct.nii.gz"),
                "label_oars": str(patient / "oars.nii.gz"),
            }
        ],
    )
    out = outputs(tmp_path)
    assert run_shard(manifest, **out, spacing=(3.0, 3.0, 3.0), progress=False).stored == 1
    store = VolumeStore(out["out_store"])
    source = nib.as_closest_canonical(nib.load(patient / "ct.nii.gz"))
    attrs = store.attrs("kbp1")
    assert attrs["original_axcodes"] == "PLI" and attrs["axcodes"] == "RAS"
    qc = pd.read_csv(out["qc_csv"]).iloc[0]
    assert qc["hu_p1"] <= -900 and qc["label_oars_voxels"] > 0
    # Same anatomy in RAS: the stored volume's mean HU matches the source's within resampling error.
    assert abs(store.read_volume("kbp1").mean() - np.asarray(source.dataobj).mean()) < 60


def test_csv_outputs_are_atomic_and_get_ordinary_permissions(tmp_path):
    """The shared atomic writer (voxelfm.utils.atomic) leaves no temporary file behind and
    gives outputs the umask's permissions, not mkstemp's owner-only 0600."""
    import os

    from voxelfm.utils.atomic import atomic_path, write_csv_atomically

    umask = os.umask(0o022)
    os.umask(umask)
    path = write_csv_atomically(pd.DataFrame({"a": [1, 2]}), tmp_path / "out" / "t.csv")
    assert pd.read_csv(path)["a"].tolist() == [1, 2]
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert pd.read_csv(path)["a"].tolist() == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]
