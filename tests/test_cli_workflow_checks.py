"""Config mistakes stop the dry run with one line each, before any job runs: label columns,
probe names, segmentation label maps, dataset roots (naming the config's own variable) and
manifest images."""

from __future__ import annotations

from test_workflow import run_snakemake, write_config

from voxelfm.config_checks import dataset_problems, task_problems, unset_variables


def test_a_broken_config_fails_the_dry_run_with_one_line_per_problem(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("scan_id,patient_id,split,finding\ns1,p1,train,1\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,patient_id,image\ns1,p1,scans/s1.nii.gz\n")
    config = write_config(
        tmp_path,
        **{
            "datasets.mine": {"manifest": str(manifest), "labels": str(labels)},
            "datasets.public": {"adapter": {"name": "shared_ct", "root": "$MY_CT_ROOT/ct"}},
            "evaluation.dataset": "mine",
            "evaluation.tasks.liver_lesion.labels": ["findng"],
            "evaluation.tasks.liver_volume.probes": ["ridge", "mlpp"],
            "evaluation.tasks.organs.dataset": "synthetic",
            "evaluation.tasks.organs.options.label_map": "segg",
        },
    )
    result = run_snakemake("-n", "--configfile", str(config), env={"MY_CT_ROOT": ""})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    expected = [
        (
            f"datasets.mine.manifest: {manifest}: line 2: image {tmp_path / 'scans/s1.nii.gz'} "
            "does not exist"
        ),
        "datasets.public.adapter.root: /ct is not a folder",
        (
            f"evaluation.tasks.liver_lesion: label column(s) findng not in {labels} "
            "(it has scan_id, patient_id, split, finding)"
        ),
        "evaluation.tasks.liver_volume: unknown regression probe(s) ['mlpp']",
        (
            "evaluation.tasks.organs.options.label_map: 'segg' is not a label map of the "
            "synthetic manifest (it has seg)"
        ),
    ]
    for line in expected:
        assert line in output, output[-3000:]
    assert "Traceback" not in output


def test_an_unset_root_variable_is_named_as_the_config_names_it(monkeypatch):
    monkeypatch.delenv("DATA", raising=False)
    problems = dataset_problems({"ctrate": {"adapter": {"name": "ctrate", "root": "${DATA}/x"}}})
    assert len(problems) == 1
    assert "names the unset environment variable DATA; set it (e.g. DATA=" in problems[0]
    assert "VOXELFM_REAL_DATA" not in problems[0]
    monkeypatch.setenv("DATA", "/somewhere")
    monkeypatch.delenv("VOXELFM_TEST_OTHER_ROOT", raising=False)
    assert unset_variables("$DATA/$VOXELFM_TEST_OTHER_ROOT") == ["VOXELFM_TEST_OTHER_ROOT"]


def test_a_good_config_has_no_problems(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("scan_id,patient_id,split,finding\n")
    config = {
        "datasets": {"mine": {"manifest": str(tmp_path / "none.csv"), "labels": str(labels)}},
        "evaluation": {
            "dataset": None,
            "tasks": {
                "lesion": {"category": "classification", "labels": ["finding"]},
                "again": {"category": "retrieval"},  # retrieval needs no split column
            },
        },
    }
    assert task_problems(config, {"mine": labels}) == []
    assert dataset_problems(config["datasets"]) == [
        f"datasets.mine.manifest: {tmp_path / 'none.csv'}: manifest does not exist"
    ]
