"""Manifest reading: path resolution, label columns, and one clear error per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxelfm.errors import InputError
from voxelfm.ingest.manifest import label_columns, label_paths, read_manifest

HEADER = "scan_id,patient_id,image"


def write(tmp_path: Path, text: str, name: str = "manifest.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_paths_are_resolved_against_the_manifest_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(
        tmp_path / "sub",
        f"{HEADER},label_seg,extra\ns1,p1,images/a.nii.gz,seg/a.nii.gz,x\ns2,p1,/abs/b.nii.gz,,y\n",
    )
    manifest = read_manifest(path)
    assert manifest["image"].tolist() == [str(tmp_path / "sub/images/a.nii.gz"), "/abs/b.nii.gz"]
    assert label_columns(manifest) == {"seg": "label_seg"}
    assert label_paths(manifest.iloc[0]) == {"seg": str(tmp_path / "sub/seg/a.nii.gz")}
    assert label_paths(manifest.iloc[1]) == {}  # empty cell: this scan has no label
    assert manifest["extra"].tolist() == ["x", "y"]


def test_tsv_and_ids_stay_text(tmp_path):
    path = write(tmp_path, "scan_id\tpatient_id\timage\n007\tNA\ta.nii.gz\n", "manifest.tsv")
    manifest = read_manifest(path)
    assert manifest["scan_id"].tolist() == ["007"]  # leading zeros kept
    assert manifest["patient_id"].tolist() == ["NA"]  # not a missing value


def test_missing_files_pass_unless_strict(tmp_path):
    path = write(tmp_path, f"{HEADER}\ns1,p1,missing.nii.gz\n")
    assert len(read_manifest(path)) == 1
    with pytest.raises(InputError, match="line 2: image .*missing.nii.gz does not exist"):
        read_manifest(path, strict=True)


def test_header_only_manifest_is_accepted_for_empty_shards(tmp_path):
    path = write(tmp_path, f"{HEADER}\n")
    assert read_manifest(path, allow_empty=True).empty
    with pytest.raises(InputError, match="has no scans"):
        read_manifest(path)


BAD_MANIFESTS = {
    "no file": (None, "manifest does not exist"),
    "empty file": ("", "manifest is empty"),
    "missing column": ("scan_id,image\ns1,a.nii.gz\n", "missing required column(s) patient_id"),
    "semicolons": ("scan_id;patient_id;image\ns1;p1;a\n", "missing required column(s)"),
    "empty image": (f"{HEADER}\ns1,p1,a.nii.gz\ns2,p2,\n", "line 3: empty 'image'"),
    "empty patient": (f"{HEADER}\ns1,,a.nii.gz\n", "line 2: empty 'patient_id'"),
    "duplicate scan": (
        f"{HEADER}\ns1,p1,a\ns2,p1,b\ns1,p1,c\n",
        "duplicate scan_id 's1' on lines 2 and 4",
    ),
    "two patients": (
        f"{HEADER}\ns1,p1,a\ns1,p2,b\n",
        "scan_id 's1' is given to two patients: 'p1' on line 2 and 'p2' on line 3",
    ),
    "unsafe scan id": (f"{HEADER}\nct/01,p1,a\n", "line 2: scan_id 'ct/01' must be"),
    "hidden scan id": (f"{HEADER}\n.x,p1,a\n", "line 2: scan_id '.x' must be"),
    "bad label name": (f"{HEADER},label_a b\ns1,p1,a,l\n", "column 'label_a b': label name 'a b'"),
    "empty label name": (f"{HEADER},label_\ns1,p1,a,l\n", "label name ''"),
    "ragged row": (f"{HEADER}\ns1,p1,a,extra,more\n", "line 2: 5 fields, the header has 3"),
    "unclosed quote": (f'{HEADER}\ns1,p1,"a\n', "cannot parse manifest"),
    "repeated column": (
        "scan_id,patient_id,image,image\ns1,p1,a,b\n",
        "column(s) image appear more than once",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_one_line_naming_the_file_and_reason(tmp_path, case):
    text, reason = BAD_MANIFESTS[case]
    path = tmp_path / "manifest.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert reason in caught.value.reason


def test_rescale_columns_are_read_per_row_and_checked(tmp_path):
    from voxelfm.ingest.manifest import rescale_of

    path = write(
        tmp_path,
        f"{HEADER},rescale_slope,rescale_intercept\ns1,p1,a.nii.gz,1,-8192\ns2,p1,b.nii.gz,,\n",
    )
    manifest = read_manifest(path)
    assert rescale_of(manifest.iloc[0]) == (1.0, -8192.0)
    assert rescale_of(manifest.iloc[1]) is None  # empty cells: the file already holds HU
    bad = write(tmp_path, f"{HEADER},rescale_slope\ns1,p1,a.nii.gz,zero\n", "bad.csv")
    with pytest.raises(InputError, match="line 2: rescale_slope 'zero' is not a usable number"):
        read_manifest(bad)


def test_manifest_rescale_turns_stored_values_into_hu(tmp_path):
    """CT-RATE-style files hold stored values; the manifest's rescale makes them HU."""
    import numpy as np
    from io_fixtures import synthetic_ct, write_nifti

    from voxelfm.io.preprocess import preprocess_scan

    image = synthetic_ct(spacing=(2.0, 2.0, 2.0), seed=1)
    stored = write_nifti(image + 1024.0, tmp_path / "stored.nii.gz")  # HU + 1024, no tags
    as_hu = preprocess_scan(write_nifti(image, tmp_path / "hu.nii.gz"), spacing=None)
    rescaled = preprocess_scan(stored, spacing=None, rescale=(1.0, -1024.0))
    np.testing.assert_array_equal(rescaled.image, as_hu.image)
    assert rescaled.meta["manifest_rescale"] == [1.0, -1024.0]
