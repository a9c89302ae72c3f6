"""`voxelfm features`: a folder of CT (files and DICOM series) to a feature table in one command;
and the command line's own help: --version, help for every option, an example per command."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
from io_fixtures import make_two_series_folder, synthetic_ct, write_nifti

from voxelfm.cli import build_parser, main
from voxelfm.io.dicom_write import write_dicom_series


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """A NIfTI file and a DICOM series in nested folders, plus files that are not CT."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "patient 1").mkdir()
    write_nifti(synthetic_ct(size=(24, 20, 16), seed=1), root / "patient 1" / "ct.nii.gz")
    write_nifti(synthetic_ct(size=(24, 20, 16), seed=3), root / "patient 1" / "seg.nii.gz")
    write_dicom_series(synthetic_ct(size=(20, 20, 12), seed=2), root / "patient 2" / "series")
    (root / "notes.txt").write_text("not a scan")
    (root / ".hidden").mkdir()
    write_nifti(synthetic_ct(seed=4), root / ".hidden" / "skip.nii.gz")
    return root


def test_a_mixed_folder_becomes_a_table(mixed_folder, tmp_path, capsys):
    out = tmp_path / "features"
    rc = main(
        [
            "features",
            str(mixed_folder),
            "--out",
            str(out),
            "--backbone",
            "tiny",
            "--device",
            "cpu",
            "--include",
            "ct.nii.gz",
            "--include",
            "series",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cost estimate: 2 scans" in printed and "forward passes" in printed
    table_path = out / "features.parquet"
    if not table_path.exists():
        table_path = out / "features.csv"
    table = (
        pd.read_parquet(table_path)
        if table_path.suffix == ".parquet"
        else pd.read_csv(table_path, dtype={"scan_id": str})
    )
    assert sorted(table["scan_id"]) == ["patient_1_ct", "patient_2_series"]
    sources = dict(zip(table["scan_id"], table["source"]))
    assert sources["patient_1_ct"] == str(mixed_folder / "patient 1" / "ct.nii.gz")
    assert sources["patient_2_series"] == str(mixed_folder / "patient 2" / "series")
    pooled = table[[f"pooled_{d}" for d in range(192)]].to_numpy()
    cls = table[[f"cls_{d}" for d in range(192)]].to_numpy()
    assert np.isfinite(pooled).all() and np.isfinite(cls).all()
    assert not np.allclose(pooled[0], pooled[1])  # two different scans, two different rows

    from voxelfm.extract import EmbeddingStore

    tokens = EmbeddingStore(out / "tokens.zarr")
    patch, affine = tokens.patch_tokens("patient_1_ct")
    assert patch.shape[-1] == 192 and affine.shape == (4, 4)
    row = table.index[table["scan_id"] == "patient_1_ct"][0]
    np.testing.assert_allclose(
        patch.reshape(-1, 192).mean(0), pooled[row], rtol=1e-2, atol=1e-2
    )  # the table's pooled vector is the mean of the stored tokens (float16 in the store)


def test_without_include_every_volume_is_a_scan_and_hidden_ones_are_not(
    mixed_folder, tmp_path, capsys
):
    out = tmp_path / "all"
    assert main(["features", str(mixed_folder), "--out", str(out), "--no-progress"]) == 0
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert sorted(manifest["scan_id"]) == ["patient_1_ct", "patient_1_seg", "patient_2_series"]
    assert "handcrafted" in capsys.readouterr().out  # the default backbone says its name


def test_a_manifest_is_accepted_as_input(mixed_folder, tmp_path):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        f"scan_id,patient_id,image\nmine,p1,{mixed_folder / 'patient 1/ct.nii.gz'}\n"
    )
    out = tmp_path / "from_manifest"
    assert main(["features", str(manifest), "--out", str(out), "--no-progress"]) == 0
    table = pd.read_csv(next(out.glob("features.*")), dtype={"scan_id": str})
    assert list(table["scan_id"]) == ["mine"] and list(table["patient_id"]) == ["p1"]


def test_a_folder_with_two_series_is_skipped_with_its_reason(tmp_path, capsys):
    make_two_series_folder(tmp_path)
    write_nifti(synthetic_ct(seed=5), tmp_path / "one.nii.gz")
    for folder in ("first", "second"):  # make_two_series_folder leaves these empty
        (tmp_path / folder).rmdir()
    out = tmp_path / "out"
    assert main(["features", str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "two_series: holds 2 DICOM series" in printed
    assert list(pd.read_csv(out / "manifest.csv")["scan_id"]) == ["one"]


def test_estimate_only_stops_before_embedding(mixed_folder, tmp_path, capsys):
    out = tmp_path / "estimate"
    rc = main(
        ["features", str(mixed_folder), "--out", str(out), "--estimate-only", "--no-progress"]
    )
    assert rc == 0
    assert "cost estimate: 3 scans" in capsys.readouterr().out
    assert not (out / "tokens.zarr").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["features", "{tmp}/nowhere", "--out", "{tmp}/o"], "nowhere: does not exist"),
        (["features", "{tmp}", "--out", "{tmp}/o"], "holds no CT volume"),
        (["features", "{tmp}", "--out", "{tmp}/o", "--backbone", "tiiny"], "neither a preset"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_manifest_rejects_an_image_that_does_not_exist(tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,patient_id,image\ns1,p1,missing.nii.gz\n")
    rc = main(["manifest", "--source", str(manifest), "--out", str(tmp_path / "checked.csv")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "line 2: image" in err and "missing.nii.gz does not exist" in err
    assert not (tmp_path / "checked.csv").exists()
    allowed = ["--allow-missing", "--out", str(tmp_path / "lenient.csv")]
    assert main(["manifest", "--source", str(manifest), *allowed]) == 0


def test_version(capsys):
    import voxelfm

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"voxelfm {voxelfm.__version__}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_every_command_an_example():
    commands = _subcommands()
    assert "features" in commands
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"voxelfm {name} {'/'.join(action.option_strings) or action.dest}"
        assert command.epilog and f"voxelfm {name}" in command.epilog, name
